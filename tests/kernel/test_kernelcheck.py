"""Refusing a kernel in one line: the feature probes (lb.dataplane.kernelcheck) and a verifier
refusal turned into the verifier's reason (lb.dataplane.loader.load_func)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from lb.config import DataplaneConfig
from lb.dataplane import kernelcheck
from lb.dataplane.loader import Balancer, compile_program, load_func, verifier_message
from lb.errors import UnsupportedKernel

pytestmark = pytest.mark.bpf

# A helper number no kernel has: its probe must fail the way a missing helper does.
NO_SUCH_HELPER = 100_000

BAD_PROGRAM = """
int xdp_bad(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;

	/* No bounds check: every verifier refuses this. */
	return *(unsigned char *)(data + 100);
}
"""


def test_every_probe_passes_on_this_kernel() -> None:
    # A probe that is wrong would refuse a good kernel: each must load where xlb runs.
    for program, features in kernelcheck.FEATURES.items():
        for f in features:
            assert kernelcheck.probe(f), f"{program}: probe for {f.name} failed"
        assert kernelcheck.missing(program) == []
        kernelcheck.require(program)


def test_a_missing_feature_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = kernelcheck.Feature(
        "bpf_future_helper", "9.1", kernelcheck.bpf.BPF_PROG_TYPE_XDP,
        kernelcheck._helper_call(NO_SUCH_HELPER),
    )  # fmt: skip
    assert not kernelcheck.probe(fake)
    features = {**kernelcheck.FEATURES, "xdp_balancer": (fake,)}
    monkeypatch.setattr(kernelcheck, "FEATURES", features)
    with pytest.raises(UnsupportedKernel) as e:
        Balancer(DataplaneConfig())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"Linux {platform.release()} cannot run xdp_balancer: it lacks bpf_future_helper"
        " (Linux 9.1); xlb runs on Linux 6.1 or newer (tested on 6.1, 6.12, 6.18)"
    )


def test_a_verifier_refusal_is_one_line_with_the_reason(tmp_path: Path) -> None:
    src = tmp_path / "bad.c"
    src.write_text(BAD_PROGRAM)
    bpf = compile_program(src, [])
    try:
        with pytest.raises(UnsupportedKernel) as e:
            load_func(bpf, "xdp_bad", bpf.XDP)
    finally:
        bpf.cleanup()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"Linux {platform.release()} refused xdp_bad: invalid access to packet")
    log = Path(msg.split("(verifier log: ", 1)[1].split(")", 1)[0])
    try:
        assert "invalid access to packet" in log.read_text()
    finally:
        log.unlink()


def test_verifier_message_skips_statistics_and_instructions() -> None:
    log = """0: R1=ctx(off=0,imm=0) R10=fp0
; return *(unsigned char *)(data + 100);
371: (0f) r1 += r4
math between pkt pointer and register with unbounded min value is not allowed
processed 152 insns (limit 1000000) max_states_per_insn 0 total_states 12 peak_states 12

"""
    assert verifier_message(log) == (
        "math between pkt pointer and register with unbounded min value is not allowed"
    )
    assert verifier_message("") == ""
