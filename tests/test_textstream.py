"""Stop strings and UTF-8 boundaries in the token-to-text stream."""

from localllm.backends.textstream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> tuple[str, bool]:
    shown, stopped = "", False
    for piece in pieces:
        scan = stream.feed(piece)
        shown += scan.text
        if scan.stopped:
            stopped = True
            break
    if not stopped:
        shown += stream.flush()
    return shown, stopped


def test_stop_string_split_across_tokens_never_leaks():
    stream = TextStream(stop=["END"])
    seen = []
    for piece in [b"Hello E", b"N", b"D more"]:
        seen.append(stream.feed(piece).text)
    assert "".join(seen) == "Hello "
    assert all("E" not in s for s in seen[1:])


def test_partial_match_that_fails_is_released():
    shown, stopped = feed_all(TextStream(stop=["END"]), [b"an E", b"N", b"vy"])
    assert (shown, stopped) == ("an ENvy", False)


def test_held_back_prefix_is_flushed_at_the_end():
    shown, stopped = feed_all(TextStream(stop=["\n\n"]), [b"one", b"\n"])
    assert (shown, stopped) == ("one\n", False)


def test_earliest_of_several_stops_wins():
    shown, stopped = feed_all(TextStream(stop=["cat", "a"]), [b"the cat"])
    assert (shown, stopped) == ("the ", True)


def test_utf8_character_split_across_tokens():
    euro = "€".encode()
    shown, _ = feed_all(TextStream(), [b"price ", euro[:1], euro[1:2], euro[2:], b"5"])
    assert shown == "price €5"


def test_nothing_after_stop():
    stream = TextStream(stop=["x"])
    assert stream.feed(b"axb").text == "a"
    assert stream.feed(b"more").text == ""
    assert stream.flush() == ""


def test_the_stop_string_that_ended_the_text_is_named():
    stream = TextStream(stop=["zz", "STOP", "ST"])
    assert feed_all(stream, [b"one S", b"TOP two"]) == ("one ", True)
    assert stream.matched == "STOP"  # both begin at the same place: the first listed that matches there
    unfinished = TextStream(stop=["END"])
    assert feed_all(unfinished, [b"no E", b"nd"]) == ("no End", False)
    assert unfinished.matched is None
