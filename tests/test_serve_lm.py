"""teacher-serve with a causal language model (issue 22): ``--teacher hf:DIR`` of a real
``transformers`` GPT-2, token ids in, per-token sparse targets out and in the cache, encoded on
the teacher's device; every bad request refused with a 4xx that writes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess

import httpx
import numpy as np
import pytest
import torch
from conftest import BIN

from kdcache.offline.cache import CacheReader
from kdcache.service.app import create_app
from kdcache.service.launch import ServeProcess
from kdcache.service.protocol import RequestedOutput, decode_response, encode_request
from kdcache.service.runtime import TeacherService
from kdcache.service.settings import ServeSettings
from kdcache.service.teacher import load_teacher

VOCAB, CONTEXT, K, T = 300, 16, 8, 2.0


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    """Issue 22's Done-when step 1: a tiny GPT-2 with random weights, save_pretrained, with a tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("gpt")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, model


def reference_logits(model, ids: np.ndarray, length: int) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids[None, :length])).logits[0].numpy()


@contextlib.asynccontextmanager
async def serving(tmp_path, gpt, **options):
    settings = ServeSettings(teacher=[f"hf:{gpt}"], cache=tmp_path / "cache", device="cpu", temperature=T, targets=f"topk:{K}", **options)
    teacher = load_teacher(settings.teacher, temperature=T, device="cpu")
    service = TeacherService.open(settings, teacher)
    await service.start()
    for _ in range(1000):
        if service.ready:
            break
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)), base_url="http://test") as client:
            yield service, client
    finally:
        await service.stop()


async def infer(client, tensors, outputs=("topk_indices", "topk_values", "tail_logmass")):
    body, headers = encode_request(tensors, outputs=[RequestedOutput(o, True) for o in outputs], binary=True)
    response = await client.post("/v2/models/teacher/infer", content=body, headers=headers)
    if response.status_code != 200:
        return response, None, None
    header, out = decode_response(response.content, response.headers.get("inference-header-content-length"))
    return response, header, out


def test_token_requests_get_per_token_targets_and_bad_ones_a_4xx_that_writes_nothing(tmp_path, gpt_dir):
    gpt, model = gpt_dir
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (3, 10)).astype(np.int64)
    lengths = np.array([10, 4, 7], dtype=np.int64)

    async def body():
        async with serving(tmp_path, gpt, max_batch_tokens=64) as (service, client):
            meta = (await client.get("/v2/models/teacher")).json()
            assert meta["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, CONTEXT]}
            assert meta["parameters"]["task"] == "lm" and meta["parameters"]["vocab_size"] == VOCAB
            assert [o["name"] for o in meta["outputs"]] == ["soft_targets", "logits", "lengths", "topk_values", "topk_indices", "tail_logmass"]
            response, header, out = await infer(client, [("input_ids", ids), ("lengths", lengths)])
            assert response.status_code == 200 and header["parameters"]["cache_misses"] == 3
            assert out["topk_indices"].shape == (3, 10, K) and out["topk_indices"].dtype == np.uint16
            for row in range(3):
                expected = reference_logits(model, ids[row], int(lengths[row]))
                top = np.argsort(-expected, axis=-1)[:, :K]
                np.testing.assert_array_equal(np.sort(out["topk_indices"][row, : lengths[row]], -1), np.sort(top, -1))
                assert not out["topk_indices"][row, lengths[row] :].any()  # padding
            # The same sequences again, as a mask: all hits, the same answer.
            mask = (np.arange(10)[None, :] < lengths[:, None]).astype(np.int64)
            again, header, hit = await infer(client, [("input_ids", np.where(mask > 0, ids, 5)), ("attention_mask", mask)])
            assert header["parameters"]["cache_hits"] == 3
            for name in out:
                np.testing.assert_array_equal(hit[name], out[name])
            _, _, dense = await infer(client, [("input_ids", ids[:1, :3])], outputs=("soft_targets",))
            np.testing.assert_allclose(dense["soft_targets"].sum(-1), 1.0, rtol=1e-5)
            stored = service.store.num_samples
            bad = {
                "a wrong dtype": [("input_ids", ids.astype(np.int32))],
                "token ids >= V": [("input_ids", np.full((1, 4), VOCAB, np.int64))],
                "L beyond the context": [("input_ids", np.zeros((1, CONTEXT + 1), np.int64))],
                "a mask of the wrong shape": [("input_ids", ids), ("attention_mask", mask[:, :5])],
                "a mask not padded on the right": [("input_ids", ids), ("attention_mask", mask[:, ::-1].copy())],
                "an empty sequence": [("input_ids", ids), ("lengths", np.array([3, 0, 2], np.int64))],
                "a batch over the token budget": [("input_ids", np.zeros((7, 10), np.int64))],
                "a label": [("input_ids", ids), ("label", np.zeros(3, np.int64))],
            }
            for case, tensors in bad.items():
                response, _, _ = await infer(client, tensors)
                assert response.status_code in (413, 422), (case, response.status_code, response.text)
                assert response.status_code == (413 if "budget" in case else 422), case
            assert service.store.num_samples == stored

    asyncio.run(body())


@pytest.mark.slow
def test_done_when_serve_push_and_a_cache_of_per_token_targets(tmp_path, gpt_dir):
    """Issue 22's Done-when 2-3 as a user runs them: teacher-serve --teacher hf:DIR --targets topk:8,
    teacher-push --data tokens.npz; the cache holds input_ids [N, L] and the targets per token."""
    gpt, model = gpt_dir
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (40, 12)).astype(np.int64)
    lengths = rng.integers(1, 13, 40)
    np.savez(tmp_path / "tokens.npz", input_ids=tokens, lengths=lengths)
    cache = tmp_path / "cache"
    args = ["--teacher", f"hf:{gpt}", "--targets", f"topk:{K}", "--cache", str(cache), "--device", "cpu", "--temperature", str(T)]
    with ServeProcess(args, tmp_path / "serve.log") as server:
        server.wait_ready()
        for attempt in range(2):  # a re-push is all cache hits
            push = subprocess.run(
                [str(BIN / "teacher-push"), "--url", server.url, "--data", str(tmp_path / "tokens.npz"), "--batch-size", "8", "--no-progress"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert push.returncode == 0, push.stderr
            if attempt == 1:
                assert "40 hits, 0 misses" in push.stdout + push.stderr, push.stdout + push.stderr
        assert server.stop() == 0
    reader = CacheReader(cache)
    meta = reader.meta
    assert (meta.task, meta.num_classes, meta.input_shape, meta.logits_layout) == ("lm", VOCAB, (CONTEXT,), f"topk:{K}")
    assert meta.tokenizer_fingerprint is not None and reader.num_samples == 40
    stored = reader.read(("inputs", "lengths", "topk_indices", "tail_logmass"))
    order = {tuple(row[:n]): i for i, (row, n) in enumerate(zip(stored["inputs"], stored["lengths"], strict=True))}
    for row, n in zip(tokens[:5], lengths[:5], strict=True):
        i = order[tuple(row[:n])]
        expected = reference_logits(model, row, int(n))
        np.testing.assert_array_equal(stored["topk_indices"][i, :n, 0], expected.argmax(-1))
        assert (stored["tail_logmass"][i, :n] < 0).all() and not stored["inputs"][i, n:].any()
    inspect = json.loads(subprocess.run([str(BIN / "cache-inspect"), str(cache), "--json"], capture_output=True, text=True, check=True).stdout)
    assert inspect["task"] == "lm" and inspect["tokens"] == int(lengths.sum())


def test_batches_are_cut_by_a_token_budget():
    """--max-batch-tokens: a batch costs its rows times its longest sequence; a request of long
    sequences is split into jobs that fit, and short ones merge up to the budget."""
    from kdcache.offline.cache import make_layout
    from kdcache.service.batcher import Batcher

    shapes: list[tuple[int, int]] = []

    def encode(inputs, views, draws, lengths):
        shapes.append((len(inputs), int(lengths.max())))
        return {"logits": np.zeros((len(inputs), 2), np.float32)}

    def ids(n, start):
        return np.arange(start, start + n).astype(str).astype(object)

    async def body():
        batcher = Batcher(encode, store=None, layout=make_layout("full"), max_batch=40, max_delay_s=60.0)
        batcher.start()  # every job is queued before the batching task first runs
        tokens = np.zeros((2, 16), np.int64)
        jobs = [batcher.submit(tokens, ids(2, 2 * i), np.full(2, -1), False, np.array([10, 4])) for i in range(3)]
        long = batcher.submit(np.zeros((5, 16), np.int64), ids(5, 10), np.full(5, -1), False, np.array([16] * 5))
        assert len(long) == 3  # 2 + 2 + 1 rows of 16 tokens under a budget of 40
        await asyncio.wait_for(asyncio.gather(*(job.future for group in [*jobs, long] for job in group)), 30)
        await batcher.stop()

    asyncio.run(body())
    assert shapes[:2] == [(4, 10), (2, 10)] and shapes[2:] == [(2, 16), (2, 16), (1, 16)]
    assert all(rows * longest <= 40 for rows, longest in shapes)
