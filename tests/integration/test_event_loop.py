"""Filesystem and CPU work (receiving, unpacking, hashing and storing an upload) runs off the event
loop: while a large adapter is uploaded, other requests keep being answered."""

from __future__ import annotations

import tarfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from tests.conftest import MODEL, Gateway

pytestmark = pytest.mark.integration

PADDING_BYTES = 256 << 20
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def large_archive(base: BaseModelSpec, tmp: Path) -> Path:
    """A rank-16 adapter on every projection (about 19 MB), shipped with 256 MB of other files."""
    folder = make_adapter(tmp / "large", base, seed=5, rank=16, targets=PROJECTIONS)
    with (folder / "optimizer_state.dat").open("wb") as padding:
        padding.truncate(PADDING_BYTES)
    archive = tmp / "large.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


def test_requests_keep_flowing_during_a_large_upload(
    gateway: Gateway, admin: httpx.Client, client: openai.OpenAI, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    archive = large_archive(base_spec, tmp_path)
    done = threading.Event()
    upload: list[httpx.Response] = []

    def send() -> None:
        # On a fast machine one upload can take well under a second: go on until there was time to watch.
        while time.monotonic() - started < 2.0 and len(upload) < 8:
            with archive.open("rb") as body:
                upload.append(admin.post("/adapters", params={"name": f"large-{len(upload)}"}, content=body))
        done.set()

    sender = threading.Thread(target=send)
    started = time.monotonic()
    sender.start()
    probes: list[float] = []
    answers = 0
    with httpx.Client(base_url=gateway.url, timeout=30) as probe:
        while not done.is_set():
            asked = time.monotonic()
            assert probe.get("/healthz").status_code == 200
            probes.append(time.monotonic() - asked)
            if len(probes) % 20 == 0:
                answers += bool(
                    client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                    ).choices
                )  # type: ignore[arg-type]
            time.sleep(0.01)
    sender.join()
    took = time.monotonic() - started
    assert [answer.status_code for answer in upload] == [201] * len(upload), upload[-1].text
    assert upload[0].json()["rank"] == 16 and upload[0].json()["size_bytes"] < PADDING_BYTES
    assert took > 1.0, "the uploads were too quick to show anything"
    assert len(probes) >= 20, f"only {len(probes)} probes answered in {took:.1f} s"
    # A loop blocked by an upload's reading, unpacking or hashing holds a probe for that long, upload after upload; a
    # loaded machine (vLLM and training beside this test) may delay a single probe by a second or so.
    stalled = sum(p for p in probes if p > 0.1)
    assert max(probes) < 2.0, f"the event loop stalled for {max(probes):.2f} s of a {took:.1f} s upload"
    assert stalled < took / 3, f"probes waited {stalled:.2f} s of a {took:.1f} s upload in all"
    assert answers >= 1
