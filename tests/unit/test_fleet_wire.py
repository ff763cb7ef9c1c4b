"""The workers' wire: rejections keep their kind and message across it."""

from __future__ import annotations

import json

import pytest

from paddler.balancer.fleet.fleet_wire import raise_rejection, rejection
from paddler.balancer.fleet.request_buffer import (
    BufferFull,
    BufferRejection,
    BufferTimeout,
    NoCandidates,
    ShuttingDown,
    UnknownModel,
)


@pytest.mark.parametrize(
    "error",
    [
        BufferFull("the request buffer is full (3 requests waiting)"),
        BufferTimeout("no llama.cpp slot became free within 60s"),
        NoCandidates("no other agent is registered"),
        ShuttingDown("the balancer is shutting down"),
    ],
)
def test_a_rejection_is_raised_again_as_its_own_kind(error: BufferRejection) -> None:
    """What the host's buffer raised, the worker raises, with the same message."""
    fields = json.loads(json.dumps(rejection(error)))
    with pytest.raises(type(error)) as raised:
        raise_rejection(fields)
    assert type(raised.value) is type(error)
    assert str(raised.value) == str(error)


def test_an_unknown_model_keeps_the_names_the_fleet_serves() -> None:
    """The 404 a worker answers lists the models as the host's buffer saw them."""
    fields = json.loads(json.dumps(rejection(UnknownModel("m9", ["m1", "m2"]))))
    with pytest.raises(UnknownModel) as raised:
        raise_rejection(fields)
    assert (raised.value.model, raised.value.served) == ("m9", ["m1", "m2"])
