"""The worker contract: task validation, errors, events (no I/O)."""

from __future__ import annotations

import json
import pickle
from typing import Any, Callable, Dict

import pytest

import tgi_adapter
from tgi_adapter import (
    EngineInfo,
    ErrorKind,
    InvalidParamsError,
    SamplingParams,
    TaskRequest,
    TokenEvent,
    WorkerAdapter,
    WorkerError,
)
from tgi_adapter.contract import U64_MAX, make_event
from tgi_adapter.errors import error_class

MakeTask = Callable[..., TaskRequest]

BASE: Dict[str, Any] = {
    "task_id": "t-1",
    "session_id": "s-1",
    "workload": "completion",
    "model_ref": "hf:org/model",
    "engine": "tgi",
    "ctx": 4096,
    "priority": "interactive",
    "max_tokens": 64,
    "deadline_ms": 30_000,
    "prompt": "Hello",
    "seed": 42,
}


def test_a_valid_task_keeps_its_fields() -> None:
    task = TaskRequest(**BASE)
    assert task.task_id == "t-1"
    assert task.determinism == "best_effort"
    assert task.sampling is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"inputs": [{"role": "user", "content": "hi"}]}, "prompt"),  # both prompt and inputs
        ({"prompt": ""}, "prompt"),
        ({"workload": "embedding"}, "workload"),
        ({"engine": "vllm"}, "engine"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"ctx": 0}, "ctx"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"deadline_ms": -1}, "deadline_ms"),
        ({"determinism": "exact"}, "determinism"),
        ({"priority": "urgent"}, "priority"),
        ({"seed": -1}, "seed"),
        ({"seed": U64_MAX + 1}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"max_tokens": 3.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"ctx": "4096"}, "ctx"),
        ({"task_id": 7}, "task_id"),
        ({"task_id": ""}, "task_id"),
        ({"prompt": 12}, "prompt"),
        ({"sampler_profile_version": 1}, "sampler_profile_version"),
        ({"expected_tokens": -1}, "expected_tokens"),
        ({"placement": "gpu0"}, "placement"),
        ({"sampling": {"temperature": 0.5}}, "sampling"),
    ],
)
def test_bad_fields_raise_invalid_params_naming_the_field(changes: Dict[str, Any], field: str) -> None:
    values = {**BASE, **changes}
    with pytest.raises(WorkerError) as info:
        TaskRequest(**values)
    assert info.value.code is ErrorKind.INVALID_PARAMS
    assert info.value.retriable is False
    assert repr(field) in info.value.message


def test_workload_error_says_tgi_serves_completions() -> None:
    with pytest.raises(InvalidParamsError, match="completion"):
        TaskRequest(**{**BASE, "workload": "rerank"})


def test_inputs_conversation_is_accepted_instead_of_prompt() -> None:
    task = TaskRequest(**{**BASE, "prompt": None, "inputs": [{"role": "user", "content": "Hi"}]})
    assert task.inputs == ({"role": "user", "content": "Hi"},)


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ("hello", "inputs"),
        ([], "inputs"),
        (["hello"], "inputs[0]"),
        ([{"content": "x"}], "inputs[0].role"),
        ([{"role": "user", "content": 3}], "inputs[0].content"),
    ],
)
def test_bad_conversations_name_the_message(inputs: Any, field: str) -> None:
    with pytest.raises(InvalidParamsError) as info:
        TaskRequest(**{**BASE, "prompt": None, "inputs": inputs})
    assert repr(field) in info.value.message


def test_from_dict_reads_the_orchestrators_json_and_ignores_other_engines_fields() -> None:
    data = json.loads(
        json.dumps(
            {**BASE, "kv_hint": "reuse", "unknown_future_field": 1, "sampling": {"temperature": 0.7, "stop": ["\n"]}}
        )
    )
    task = TaskRequest.from_dict(data)
    assert task.kv_hint == "reuse"
    assert task.sampling == SamplingParams(temperature=0.7, stop=("\n",))
    assert TaskRequest.from_dict(task.to_dict()) == task


@pytest.mark.parametrize("missing", ["task_id", "session_id", "ctx", "max_tokens", "deadline_ms", "priority"])
def test_from_dict_names_a_missing_required_field(missing: str) -> None:
    data = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(InvalidParamsError) as info:
        TaskRequest.from_dict(data)
    assert repr(missing) in info.value.message


@pytest.mark.parametrize("data", [[1, 2], "task", None])
def test_from_dict_refuses_non_objects(data: Any) -> None:
    with pytest.raises(InvalidParamsError, match="'task'"):
        TaskRequest.from_dict(data)


def test_from_dict_refuses_unknown_sampling_keys() -> None:
    with pytest.raises(InvalidParamsError, match="temprature"):
        TaskRequest.from_dict({**BASE, "sampling": {"temprature": 0.5}})


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"typical_p": 2.0}, "sampling.typical_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"top_k": 1.5}, "sampling.top_k"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"frequency_penalty": 3.0}, "sampling.frequency_penalty"),
        ({"stop": ["ok", ""]}, "sampling.stop"),
        ({"stop": "\n"}, "sampling.stop"),
        ({"truncate": 0}, "sampling.truncate"),
        ({"best_of": 0}, "sampling.best_of"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"grammar": {"type": "xml", "value": ""}}, "sampling.grammar"),
        ({"do_sample": "yes"}, "sampling.do_sample"),
    ],
)
def test_sampling_values_the_engine_would_reject_are_refused(values: Dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParamsError) as info:
        SamplingParams(**values)
    assert repr(field) in info.value.message


def test_off_values_are_accepted() -> None:
    params = SamplingParams(temperature=0, top_p=1.0, typical_p=1.0, top_k=0)
    assert not params.wants_sampling
    assert SamplingParams(temperature=0.7).wants_sampling


def test_tasks_are_immutable() -> None:
    task = TaskRequest(**BASE)
    with pytest.raises(AttributeError):
        task.max_tokens = 5  # type: ignore[misc]


# -- errors ------------------------------------------------------------------------------


def test_there_is_one_subclass_per_code() -> None:
    classes = {error_class(kind) for kind in ErrorKind}
    assert len(classes) == len(ErrorKind) == 12
    for kind in ErrorKind:
        cls = error_class(kind)
        assert issubclass(cls, WorkerError)
        assert cls.code is kind
        assert cls.__name__ in tgi_adapter.__all__


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_errors_pickle_with_their_attributes(kind: ErrorKind) -> None:
    error = WorkerError.from_code(kind, "it broke", retriable=True, retry_after_ms=1500, advice="try again")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.code, copy.message, copy.retriable, copy.retry_after_ms, copy.advice) == (
        kind,
        "it broke",
        True,
        1500,
        "try again",
    )


def test_error_event_and_envelope_carry_the_contract_keys() -> None:
    error = WorkerError.from_code("ADMISSION_REJECT", "engine is full", retry_after_ms=250)
    event = error.to_event()
    assert event.kind == "error"
    assert set(event.data) == {"code", "message", "retriable", "retry_after_ms", "engine"}
    assert event.data["code"] == "ADMISSION_REJECT"
    assert event.data["retriable"] is True
    assert event.data["retry_after_ms"] == 250
    assert event.data["engine"] == "tgi"
    assert "engine is full" in event.data["message"]
    assert error.to_envelope() == event.data
    json.dumps(error.to_envelope())


def test_unknown_codes_become_internal() -> None:
    assert WorkerError.from_code("NOPE", "x").code is ErrorKind.INTERNAL


def test_error_round_trips_through_its_event_data() -> None:
    error = WorkerError.from_code("DECODE_TIMEOUT", "stalled", retry_after_ms=None)
    again = WorkerError.from_event_data(error.to_event().data)
    assert type(again) is type(error)
    assert again.retriable is True


def test_invalid_params_is_also_a_value_error() -> None:
    assert issubclass(InvalidParamsError, ValueError)


# -- events and values -------------------------------------------------------------------


def test_fast_event_constructor_matches_the_dataclass() -> None:
    fast = make_event("token", {"t": "a", "i": 0})
    slow = TokenEvent("token", {"t": "a", "i": 0})
    assert fast == slow
    assert pickle.loads(pickle.dumps(fast)) == slow
    with pytest.raises(AttributeError):
        fast.kind = "end"  # type: ignore[misc]
    assert fast.to_dict() == {"kind": "token", "data": {"t": "a", "i": 0}}


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (EngineInfo(version="3.3.6", sha="1a2b3c4d5e6f"), "3.3.6+sha.1a2b3c4"),
        (EngineInfo(version="2.0.2", docker_label="sha-dccab72"), "2.0.2+sha-dccab72"),
        (EngineInfo(version="1.4.0"), "1.4.0"),
        (EngineInfo(), "unknown"),
    ],
)
def test_engine_version_is_version_plus_build(info: EngineInfo, expected: str) -> None:
    assert info.engine_version == expected


def test_worker_adapter_is_abstract() -> None:
    with pytest.raises(TypeError):
        WorkerAdapter()  # type: ignore[abstract]
    assert {"health", "props", "submit", "cancel", "engine_version"} <= WorkerAdapter.__abstractmethods__
