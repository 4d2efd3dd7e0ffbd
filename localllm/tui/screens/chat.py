"""The chat screen: conversations on the left, messages in the middle, the message box below.

Replies stream on the app's event loop from the backend's engine thread (an
async worker iterating `backend.generate`), so the UI never waits on the model.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Static

from localllm.core.reasoning import ReplyReasoning
from localllm.core.requests import FinishEvent, GenerationRequest, TokenEvent
from localllm.backends.chat_fit import ChatTooLong, FittedChat, fit_chat
from localllm.core.errors import LocalLLMError
from localllm.tui.conversations import ChatSettings, Conversation, Message, title_from
from localllm.tui.widgets.message_view import MessageView
from localllm.tui.widgets.prompt_input import PromptInput
from localllm.tui.widgets.reply_painter import ReplyPainter


WELCOME = (
    "Type a message below and press [b]Enter[/b].\n\n"
    "[b]F1[/b] help · [b]F3[/b] models and downloads · [b]F5[/b] API server · [b]Ctrl+P[/b] every command"
)
SIDEBAR_MIN_WIDTH = 90  # narrower terminals start with the chat list hidden (Ctrl+B shows it)


class ConversationItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__(Label(conversation.title, markup=False))
        self.conversation = conversation


class ChatScreen(Screen):
    AUTO_FOCUS = "PromptInput"
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate", show=False),
        Binding("ctrl+e", "edit_last", "Edit last", priority=True, show=False),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("f6", "rename", "Rename", show=False),
        Binding("f8", "delete_chat", "Delete chat", show=False),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", show=False),
        Binding("ctrl+f", "search", "Search", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(name="chat")
        self.conversation: Conversation | None = None
        self.draft_settings = ChatSettings()
        self.request_id: str | None = None
        self.shown_drop = 0  # messages the last drop notice named, so each new drop is said once
        self.sidebar_chosen = False  # once the user shows or hides the list, the width no longer decides

    # -- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Input(placeholder="search chats", id="search")
                yield ListView(id="conversations")
            with Vertical(id="main"):
                with Horizontal(id="status-row"):
                    yield Static("", id="model-status")
                    yield Static("", id="context-meter")
                yield VerticalScroll(id="messages")
                yield PromptInput(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#messages").mount(Static(WELCOME, classes="welcome"))
        self.refresh_conversations()
        self.show_model_status()

    @property
    def settings(self) -> ChatSettings:
        return self.conversation.settings if self.conversation else self.draft_settings

    @property
    def model_name(self) -> str:
        return self.conversation.model if self.conversation else self.app.default_model

    @property
    def generating(self) -> bool:
        return self.request_id is not None

    # -- conversations -----------------------------------------------------------
    def refresh_conversations(self) -> None:
        search = self.query_one("#search", Input).value
        listing = self.query_one("#conversations", ListView)
        listing.clear()
        for conversation in self.app.conversations.list(search):
            item = ConversationItem(conversation)
            listing.append(item)
            if self.conversation and conversation.id == self.conversation.id:
                listing.index = len(listing) - 1

    @on(Input.Changed, "#search")
    def _search(self) -> None:
        self.refresh_conversations()

    @on(ListView.Selected, "#conversations")
    def _open_selected(self, event: ListView.Selected) -> None:
        if isinstance(event.item, ConversationItem):
            self.open_conversation(event.item.conversation.id)
            self.query_one(PromptInput).focus()

    def open_conversation(self, conversation_id: int | None) -> None:
        if self.generating:
            self.notify("a reply is streaming: Esc stops it first", severity="warning")
            return
        self.conversation = self.app.conversations.get(conversation_id) if conversation_id else None
        messages = self.query_one("#messages", VerticalScroll)
        messages.remove_children()
        self.shown_drop = 0
        self.show_meter(None, None)
        if self.conversation:
            messages.mount_all(MessageView(m) for m in self.app.conversations.messages(self.conversation.id))
            messages.scroll_end(animate=False)
        else:
            messages.mount(Static(WELCOME, classes="welcome"))
        self.app.ensure_model(self.model_name, self.settings.n_ctx)
        self.show_model_status()

    def action_new_chat(self) -> None:
        self.draft_settings = replace(self.app.default_settings)
        self.open_conversation(None)
        self.refresh_conversations()
        self.query_one(PromptInput).focus()

    def on_resize(self, event) -> None:
        if not self.sidebar_chosen:
            self.query_one("#sidebar").display = event.size.width >= SIDEBAR_MIN_WIDTH

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display
        self.sidebar_chosen = True

    def action_search(self) -> None:
        self.query_one("#sidebar").display = True
        self.sidebar_chosen = True
        self.query_one("#search", Input).focus()

    def action_rename(self) -> None:
        if not self.conversation:
            self.notify("nothing to rename yet: send a message first")
            return
        from localllm.tui.screens.dialogs import TextPrompt

        def done(title: str | None) -> None:
            if title and self.conversation:
                self.app.conversations.rename(self.conversation.id, title)
                self.conversation.title = title
                self.refresh_conversations()

        self.app.push_screen(TextPrompt("Rename chat", self.conversation.title), done)

    def action_delete_chat(self) -> None:
        if not self.conversation:
            return
        from localllm.tui.screens.dialogs import Confirm

        doomed = self.conversation

        def done(yes: bool | None) -> None:
            if yes:
                self.app.conversations.delete(doomed.id)
                self.open_conversation(None)
                self.refresh_conversations()
                self.notify(f"deleted “{doomed.title}”")

        self.app.push_screen(Confirm(f"Delete the chat “{doomed.title}”?"), done)

    def action_settings(self) -> None:
        from localllm.tui.screens.settings import SettingsScreen

        def done(settings: ChatSettings | None) -> None:
            if settings is None:
                return
            if self.conversation:
                self.conversation.settings = settings
                self.app.conversations.update(self.conversation)
            else:
                self.draft_settings = settings
            self.app.ensure_model(self.model_name, settings.n_ctx)
            self.show_model_status()

        self.app.push_screen(SettingsScreen(self.settings), done)

    def use_model(self, model: str) -> None:
        """Switch this chat to `model` (from the models screen)."""
        if self.conversation:
            self.conversation.model = model
            self.app.conversations.update(self.conversation)
        else:
            self.app.default_model = model
        self.app.ensure_model(model, self.settings.n_ctx)
        self.show_model_status()

    def show_model_status(self) -> None:
        session = self.app.session
        if session.loading:
            text = f"loading {session.loading} …"
        elif session.current:
            text = f"model: {session.current.name}"
        else:
            text = "no model loaded"
        self.query_one("#model-status", Static).update(text)

    # -- sending and streaming ------------------------------------------------------
    @on(PromptInput.Submitted)
    def _submitted(self, event: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        self.query_one(PromptInput).clear()
        self.send(event.text.strip())

    def send(self, text: str) -> None:
        if self.conversation is None:
            self.conversation = self.app.conversations.create(self.model_name, self.draft_settings, title_from(text))
            self.refresh_conversations()
        message = self.app.conversations.add_message(self.conversation.id, Message("user", text))
        for hint in self.query(".welcome"):
            hint.remove()
        self.query_one("#messages", VerticalScroll).mount(MessageView(message))
        self.reply()

    def reply(self) -> None:
        view = MessageView(Message("assistant", ""))
        messages = self.query_one("#messages", VerticalScroll)
        messages.mount(view)
        messages.anchor()
        self.request_id = uuid.uuid4().hex
        self.stream_reply(view, self.request_id)

    @work(group="reply", exclusive=True)
    async def stream_reply(self, view: MessageView, request_id: str) -> None:
        assert self.conversation is not None
        conversation, text, stats, stopped, quitting = self.conversation, "", None, False, False
        thoughts = ""
        painter: ReplyPainter | None = None
        discarded = False  # no reply at all: its view goes
        try:
            backend = await self.app.wait_for_model(conversation.model, conversation.settings.n_ctx)
            history = self.app.conversations.messages(conversation.id)
            s = conversation.settings
            chat = [{"role": "system", "content": s.system}] if s.system else []
            chat += [{"role": m.role, "content": m.content} for m in history]
            fitted = await asyncio.to_thread(fit_chat, backend, chat, max_tokens=s.sampling.max_tokens)
            self.say_what_was_dropped(fitted, view)
            generated = 0
            self.show_meter(fitted.prompt_tokens, fitted.context)
            # stand-ins for a backend may carry no model facts: no template, no thoughts
            splitter = ReplyReasoning.of(getattr(backend.info, "chat_template", None), fitted.prompt).stream()

            def frame() -> None:
                self.show_meter(fitted.prompt_tokens, fitted.context, generated)
                if thoughts != view.message.reasoning:
                    view.show_thoughts(thoughts)

            painter = ReplyPainter(view.body, frame)
            started = time.perf_counter()
            request = GenerationRequest(request_id, fitted.prompt, s.request_params(), templated=True, messages=fitted.messages)
            async for event in backend.generate(request):
                if isinstance(event, TokenEvent):
                    answer = event.text
                    if splitter is not None:
                        split = splitter.feed(event.text)
                        thoughts, answer = thoughts + split.reasoning, split.answer
                    text += answer
                    generated += len(event.token_ids)
                    painter.add(answer)
                elif isinstance(event, FinishEvent):
                    if splitter is not None:
                        split = splitter.flush()
                        thoughts, text = thoughts + split.reasoning, text + split.answer
                        painter.add(split.answer)
                    stopped = event.reason == "abort"
                    stats = _stats(event, started)
                    generated = event.usage.completion_tokens
                    if event.reason == "error":
                        self.notify(event.error or "generation failed", severity="error", timeout=8)
            await painter.close()
            await view.body.update(text)  # one clean render of the whole reply once it is complete
            view.show_thoughts(thoughts)
        except ChatTooLong as exc:
            stopped = discarded = True
            self.give_back_last_message(view, str(exc))
        except LocalLLMError as exc:
            self.notify(str(exc), severity="error", timeout=8)
            stopped = True
        except asyncio.CancelledError:  # the app is quitting mid-reply: keep what was written
            stopped = quitting = True
            raise
        finally:
            self.request_id = None
            if painter is not None:
                painter.cancel()  # done already, unless the reply failed or the app is quitting
            view.message.content, view.message.stats, view.message.stopped = text, stats, stopped
            if text or stats:
                self.app.conversations.add_message(conversation.id, view.message)
            if discarded:
                view.remove()
            elif not quitting:
                view.show_stats(stats, stopped)
                self.refresh_conversations()

    def say_what_was_dropped(self, fitted: FittedChat, reply: MessageView) -> None:
        """A line in the conversation when more earlier turns no longer fit than last time."""
        if fitted.notice and fitted.dropped_messages != self.shown_drop:
            self.shown_drop = fitted.dropped_messages
            self.query_one("#messages", VerticalScroll).mount(Static(fitted.notice, classes="notice", markup=False), before=reply)

    def give_back_last_message(self, reply: MessageView, error: str) -> None:
        """A message larger than the context: say so, and put it back in the box to shorten (nothing is lost)."""
        assert self.conversation is not None
        self.notify(error, severity="error", timeout=10)
        views = list(self.query(MessageView))
        users = [v for v in views if v.message.role == "user"]
        if users and users[-1].message.id is not None:
            self.app.conversations.delete_messages_from(self.conversation.id, users[-1].message.id)
            self.query_one(PromptInput).text = users[-1].message.content
            users[-1].remove()
        self.query_one("#messages", VerticalScroll).mount(Static(f"error: {error}", classes="notice error", markup=False), before=reply)

    def show_meter(self, prompt_tokens: int | None, n_ctx: int | None, generated: int = 0) -> None:
        """`context 1,234 / 4,096`: what the chat and the reply so far take of the model's context."""
        meter = self.query_one("#context-meter", Static)
        if prompt_tokens is None:
            text = f"context {n_ctx:,}" if n_ctx else ""
        else:
            used = prompt_tokens + generated
            text = f"context {used:,} / {n_ctx:,}" if n_ctx else f"{used:,} tokens"
        meter.update(text, layout=False)  # a fixed width: no layout pass for each frame of a reply

    def action_stop(self) -> None:
        if self.request_id and self.app.session.backend:
            self.app.session.backend.abort(self.request_id)

    def _last(self, role: str) -> MessageView | None:
        views = list(self.query(MessageView))
        return views[-1] if views and views[-1].message.role == role else None

    def action_regenerate(self) -> None:
        if self.generating or not self.conversation:
            return
        last = self._last("assistant")
        if last is None:
            if self._last("user"):
                self.reply()
            return
        if last.message.id is not None:
            self.app.conversations.delete_messages_from(self.conversation.id, last.message.id)
        last.remove()
        self.reply()

    def action_edit_last(self) -> None:
        """Put the last message back in the box; sending it replaces it and its reply."""
        if self.generating or not self.conversation:
            return
        views = list(self.query(MessageView))
        users = [v for v in views if v.message.role == "user"]
        if not users:
            return
        target = users[-1]
        if target.message.id is not None:
            self.app.conversations.delete_messages_from(self.conversation.id, target.message.id)
        for view in views[views.index(target):]:
            view.remove()
        prompt = self.query_one(PromptInput)
        prompt.text = target.message.content
        prompt.focus()


def _stats(event: FinishEvent, started: float) -> dict:
    tokens = event.usage.completion_tokens
    return {
        "ttft_s": event.timings.ttft_s,
        "completion_tokens": tokens,
        "prompt_tokens": event.usage.prompt_tokens,
        "tokens_per_s": event.timings.decode_tokens_per_s(tokens),
        "reason": event.reason,
        "wall_s": time.perf_counter() - started,
    }
