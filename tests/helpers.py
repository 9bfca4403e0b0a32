"""Helpers shared by several test files (no test imports another test file)."""

from __future__ import annotations

import collections
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

import actstore
from actstore.sae.config import SAEConfig
from actstore.sae.files import save_sae
from actstore.sae.model import SAE


def one_line_error(r, *needles: str) -> str:
    """A CLI result that failed with one clean line (no traceback) containing every needle; the line."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), (
        f"traceback instead of a one-line error: {r.exception!r}\n{r.output}"
    )
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: str | Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def make_sae(
    store,
    name: str,
    arch: str,
    layer: int = 2,
    d_sae: int = 40,
    k: int | None = None,
    seed: int = 0,
) -> SAE:
    """A seeded random SAE with a negative encoder bias (so relu-l1 is sparse), saved in ``store``."""
    tk = store.model_info("tiny").tokenization
    torch.manual_seed(seed)
    sae = SAE(
        SAEConfig(
            arch=arch,
            d_in=32,
            d_sae=d_sae,
            k=k,
            model="tiny",
            layer=layer,
            tokenization=tk,
            name=name,
            norm_scale=0.7,
        )
    )
    with torch.no_grad():
        # unit decoder rows, as these tests were written for (training starts them at 0.1)
        if arch == "relu-l1":
            from actstore.sae.model import RELU_DECODER_INIT_NORM

            sae.W_dec.div_(RELU_DECODER_INIT_NORM)
            sae.W_enc.div_(RELU_DECODER_INIT_NORM)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.3 - 0.6)
        sae.b_dec.copy_(torch.randn(32) * 0.1)
    save_sae(store, sae, name)
    return sae


def dense_numpy(store, sae: SAE) -> np.ndarray:
    """Reference activations (n_tokens, d_sae) in float64 numpy from the SAE's weights."""
    x = store.activations(sae.cfg.model, sae.cfg.layer)[:].astype(np.float64)  # (n_tokens, d_model)
    w = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    pre = (x * sae.cfg.norm_scale - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # (n_tokens, d_sae)
    if sae.cfg.arch == "relu-l1":
        return np.maximum(pre, 0.0)
    k = int(sae.cfg.k)
    idx = np.argsort(-pre, axis=1)[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, axis=1), 0.0), axis=1)
    return out


def reference_hidden_states(model_dir: str, texts: list[str], max_length: int = 512) -> list[tuple]:
    """Per text, the full model's hidden_states (unpadded, batch of one)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=max_length)
            hs = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                output_hidden_states=True,
            ).hidden_states
            out.append(tuple(h[0].numpy() for h in hs))
    return out


def stored_by_sample(st_: actstore.Store, model: str, layer: int) -> list[np.ndarray]:
    acts = st_.activations(model, layer)[:]
    first_row, n_tok = st_.tokenization().sample_rows()
    return [acts[a : a + n] for a, n in zip(first_row, n_tok, strict=True)]


class Counter:
    """What crossed a :func:`counting_proxy`: response bytes, requests, and each request's method and path."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def add(self, n: int, method: str = "", path: str = "") -> None:
        with self.lock:
            self.bytes += n
            self.requests += 1
            self.log.append((method, path))

    def reset(self) -> None:
        with self.lock:
            self.bytes = self.requests = 0
            self.log: list[tuple[str, str]] = []

    def by_method(self, contains: str) -> collections.Counter:
        """Requests whose path contains ``contains``, counted by (method, path)."""
        with self.lock:
            return collections.Counter((m, p.split("?")[0]) for m, p in self.log if contains in p)


def counting_proxy(target_port: int, counter: Counter) -> ThreadingHTTPServer:
    """A forwarding HTTP proxy to 127.0.0.1:target_port (moto's S3 server) that counts every request and its
    response bytes (headers excluded)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            counter.add(len(data), self.command, self.path)
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in (
                    "transfer-encoding",
                    "connection",
                    "content-length",
                    "server",
                    "date",
                ):
                    self.send_header(k, v)
            length = len(data) if self.command != "HEAD" else resp.getheader("Content-Length") or 0
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def killed_on_call(real, n: int):
    """``real`` wrapped to raise KeyboardInterrupt (a kill) on its ``n``-th call."""
    calls = []

    def wrapper(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    return wrapper
