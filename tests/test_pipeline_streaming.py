"""TextGenerationPipeline's options are in its signature, and it streams: the pieces of a
prompt join to exactly the text the same call returns without streaming (stop strings too)."""

from __future__ import annotations

import inspect

import pytest

from gptj.execution.inference.pipelines import TextGenerationPipeline

PROMPTS = ["The quick brown fox", "Once upon a time"]


@pytest.fixture(scope="module")
def generator():
    return TextGenerationPipeline.from_pretrained("random:tiny", precision="fp32", device="cpu")


def test_the_options_are_in_the_signature(generator):
    parameters = inspect.signature(TextGenerationPipeline.__call__).parameters
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "adapter", "stream"):
        assert name in parameters, name
    with pytest.raises(TypeError, match="max_tokens"):
        generator(PROMPTS[0], max_tokens=3)


def test_streamed_pieces_join_to_the_returned_text(generator):
    options = dict(max_new_tokens=24, temperature=0.8, seed=5)
    whole = generator(PROMPTS[0], **options)
    pieces = list(generator(PROMPTS[0], stream=True, **options))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == whole
    assert "".join(generator.stream(PROMPTS[0], **options)) == whole


def test_a_stop_string_is_never_streamed(generator):
    free = generator(PROMPTS[0], max_new_tokens=24, temperature=0.8, seed=5)
    stop = free[6:9]  # a string the continuation holds: the text ends before it
    assert len(stop) == 3
    whole = generator(PROMPTS[0], max_new_tokens=24, temperature=0.8, seed=5, stop=[stop])
    assert whole == free[:free.find(stop)]
    pieces = list(generator(PROMPTS[0], max_new_tokens=24, temperature=0.8, seed=5, stop=[stop], stream=True))
    assert "".join(pieces) == whole and stop not in "".join(pieces)


def test_a_list_streams_index_and_piece_pairs(generator):
    options = dict(max_new_tokens=12, temperature=0.8, seed=2)
    whole = generator(PROMPTS, **options)
    joined = ["", ""]
    for index, piece in generator(PROMPTS, stream=True, **options):
        joined[index] += piece
    assert joined == whole


def test_closing_the_stream_early_stops_generating(generator):
    stream = generator(PROMPTS[0], max_new_tokens=200, stream=True)
    first = next(stream)
    stream.close()  # the worker stops at its next token; the pipeline serves the next call
    assert first and generator(PROMPTS[0], max_new_tokens=4) == generator(PROMPTS[0], max_new_tokens=4)
