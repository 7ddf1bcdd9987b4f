"""The AOT-as-launched instrument (tests/aot.py) itself: the specializations it compiles with, and its SASS reading."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, check_aot, check_sass

SASS = """
        /*0090*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a0*/                   LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*00b0*/                   LDG.E.EL.64.CONSTANT R10, desc[UR4][R6.64] ;
        /*00c0*/                   LDG.E R11, desc[UR4][R6.64] ;
        /*00d0*/                   STG.E.128 desc[UR4][R12.64], R4 ;
        /*00e0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00f0*/                   UTMALDG.2D [UR8], [UR10] ;
        /*0100*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
"""


def test_sass_summary():
    aot = pytest.importorskip("tests.aot")
    s = aot.sass_summary(SASS)
    assert s["ldg"] == {"128": 1, "16": 1, "64": 1, "32": 1} and s["stg"] == {"128": 1}
    assert s["vector128"] and (s["hgmma"], s["utmaldg"], s["ldgsts"]) == (1, 1, 1)


def test_launch_attrs_spelling():
    """Pointers and integers get ``tt.divisibility`` 16, in the spelling the installed Triton parses."""
    aot = pytest.importorskip("tests.aot")

    class Entry:
        signature = {"x_ptr": "*fp32", "n": "i64", "stride_xm": "i32", "BLOCK": "constexpr", "y_ptr": "*fp16"}
        unaligned = ("stride_xm",)

    attrs = aot.launch_attrs(Entry())
    if isinstance(attrs, dict):
        assert set(attrs) == {(0,), (1,), (4,)}
        assert all(v == [["tt.divisibility", 16]] for v in attrs.values())


def test_check_sass():
    row = {"kernel": "k", "dtypes": ["*fp16"], "constexprs": {}, "ldg": {"16": 8}, "stg": {"16": 8},
           "vector128": False, "hgmma": 0, "utmaldg": 0}
    check_sass([row], vector128=("other",))
    with pytest.raises(AssertionError, match="no vector128"):
        check_sass([row], vector128=("k",))
    with pytest.raises(AssertionError, match="no hgmma"):
        check_sass([row], hgmma=("k",))


def test_as_launched_vectorizes():
    """The relu forward, fp16, compiled as launched loads and stores 128 bits; without the launch's
    alignment it falls back to 16-bit accesses: the audit compiles what runs."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, tests.aot as a, scratchops._kernels.activations as k\n"
            "e = next(x for x in k.aot_configs() if x.fn.__name__ == '_activation_fwd_kernel'"
            " and x.signature['x_ptr'] == '*fp16')\n"
            "print(json.dumps([a.compile_config(e, True), a.compile_config(e, False)]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    launched, plain = json.loads(run.stdout.splitlines()[-1])
    assert launched["vector128"] and launched["ldg"] == {"128": 1} and launched["stg"] == {"128": 1}, launched
    assert not plain["vector128"], plain


def test_table_groups_by_element_type():
    """A kernel whose element type is a DTYPE constexpr (SGD: addresses read from a table) is grouped by it."""
    aot = pytest.importorskip("tests.aot")
    base = {"kernel": "k", "dtypes": ["*fp64", "*i64"], "registers": 8, "stack": 0, "local": 0, "vector128": True,
            "hgmma": 0, "ldgsts": 0, "utmaldg": 0}
    rows = [{**base, "constexprs": {"DTYPE": t}} for t in ("fp16", "bf16", "fp32")]
    lines = aot.table(rows).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["*fp32", "16-bit"]
    assert lines[1].split(" | ")[2] == "2"


SM90_SHARED = 232448  # the most shared memory one block may use on sm_90 (227 KB): a config over it cannot launch


@pytest.mark.parametrize("family", ["linear", "linear_bwd"])
def test_linear_sm90_fast_path(family):
    """linear's sm_90 compiles as launched: each TMA kernel compile loads through TMA (UTMALDG) into wgmma
    (HGMMA); each 16-bit/tf32 compile of the pointer GEMMs uses wgmma; every compile fits in shared memory."""
    rows = check_aot(f"scratchops._kernels.{family}")
    tma = [r for r in rows if r["kernel"].endswith("_tma_kernel")]
    assert tma, "no TMA kernel compiled"
    check_sass(tma, hgmma={r["kernel"] for r in tma}, utmaldg={r["kernel"] for r in tma})
    tensor_core = [r for r in rows if r["constexprs"].get("INPUT_PRECISION") == "tf32"]
    check_sass(tensor_core, hgmma={r["kernel"] for r in tensor_core})
    assert all(r["smem"] <= SM90_SHARED for r in rows), [(r["kernel"], r["constexprs"], r["smem"]) for r in rows
                                                          if r["smem"] > SM90_SHARED]
