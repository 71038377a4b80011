"""The CUDA-graph step's bookkeeping (``training/cuda_graph.py``) on the CPU, with torch's CUDA stream
and graph objects replaced by stand-ins: eager warm-up steps, one capture, replays that read the
batch copied into the captured step's tensors, one-line errors for batches that do not fit the
graph and for a failed capture (naming the first failure inside it). That a replay computes the
eager step's bits is a GPU test (``tests/test_gpu.py::test_cuda_graph_step_computes_the_eager_step``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_lasp.training import cuda_graph


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: the "captured" step runs again on replay, on the
    tensors it was captured with (what a real replay does on the GPU)."""

    def __init__(self):
        self.step = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.step()


@pytest.fixture
def fake_cuda(monkeypatch):
    streams = []

    class _Stream:
        def synchronize(self):
            pass

    @contextlib.contextmanager
    def graph(g, stream=None, capture_error_mode=None):
        assert stream is streams[-1] and capture_error_mode == "thread_local"
        yield
        # after the capture: the step to replay is the one just run, on its tensors
        g.step = _FakeGraph.pending

    monkeypatch.setattr(torch.cuda, "Stream", lambda: streams.append(_Stream()) or streams[-1])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: streams.append(s))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "previous")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return streams


def _step(calls):
    """A "forward-backward" whose outputs are written in place (as a graph's outputs are)."""
    out = {}

    def step(batches):
        calls.append(batches)
        total = sum(b["tokens"].sum() for b in batches) * batches[0]["loss_scale"]

        def run():
            out.setdefault("loss", torch.zeros(()))
            out["loss"].copy_(sum(b["tokens"].sum() for b in batches) * batches[0]["loss_scale"])

        _FakeGraph.pending = run
        run()
        assert torch.equal(out["loss"], total)
        return [out]

    return step


def _batch(value, n=4):
    return {"tokens": torch.full((1, n), float(value)), "loss_scale": torch.tensor(0.5), "name": "kept"}


def test_warmup_capture_and_replays(fake_cuda):
    graph = cuda_graph.StepGraph(warmup_steps=2)
    assert fake_cuda[-1] is graph.stream  # its stream is current from construction on
    calls = []
    step = _step(calls)
    results = [graph.run(step, [_batch(i)], i + 1)[0]["loss"].clone() for i in range(5)]
    # two eager steps, the capture (the step runs once, as a capture does), then replays only
    assert len(calls) == 3 and graph.captured and graph.capture_iteration == 3
    assert graph.eager_steps == 2 and graph.replays == 3
    # each replay reads the batch copied into the captured tensors: the loss of that step's batch
    assert [float(r) for r in results] == [0.5 * 4 * i for i in range(5)]
    assert graph.static[0]["name"] == "kept" and float(graph.static[0]["tokens"][0, 0]) == 4.0
    graph.close()
    assert fake_cuda[-1] == "previous" and graph.graph is None and graph.captured


def test_a_batch_that_does_not_fit_the_graph_is_one_line(fake_cuda):
    graph = cuda_graph.StepGraph(warmup_steps=1)
    step = _step([])
    graph.run(step, [_batch(1)], 1)
    graph.run(step, [_batch(2)], 2)  # captured
    with pytest.raises(cuda_graph.GraphCaptureError, match=r"batch field 'tokens' is \(1, 5\).*captured with "
                       r"\(1, 4\).*run without --cuda-graph-impl"):
        graph.run(step, [_batch(3, n=5)], 3)
    with pytest.raises(cuda_graph.GraphCaptureError, match="has 1 micro-batches, this one 2"):
        graph.run(step, [_batch(3), _batch(4)], 3)
    with pytest.raises(cuda_graph.GraphCaptureError, match="a batch's fields changed"):
        graph.run(step, [dict(_batch(3), extra=torch.zeros(1))], 3)


def test_a_failed_capture_names_its_first_error(fake_cuda, monkeypatch):
    @contextlib.contextmanager
    def failing_graph(g, stream=None, capture_error_mode=None):
        try:
            yield
        finally:  # what torch's capture end says after a failure inside the capture
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    graph = cuda_graph.StepGraph(warmup_steps=1)

    calls = []

    def step(batches):  # the second call is the capture's
        calls.append(batches)
        if len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        return []

    graph.run(step, [_batch(1)], 1)
    with pytest.raises(cuda_graph.GraphCaptureError) as info:
        graph.run(step, [_batch(2)], 2)
    message = str(info.value)
    assert message == ("iteration 2: capturing the step in a CUDA graph failed (operation not permitted when "
                       "stream is capturing); run without --cuda-graph-impl"), message
    assert not graph.captured


def test_warmup_steps_must_be_positive(fake_cuda):
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        cuda_graph.StepGraph(warmup_steps=0)
