"""benchmarks/compiled.py's reading of an optimized HLO: the bytes a program moves in device memory.

The TPU compilers themselves run in ``.ci/compiled``; here their output, trimmed
to what the count reads.
"""

from __future__ import annotations

from benchmarks import compiled

MIB = 2**20

# A TPU v5e step on one f32[512,2048] leaf (from `python -m benchmarks.compiled`, trimmed):
# the gradient prefetched into VMEM (S(1)) as four slices joined by a ConcatBitcast.
TPU = """
ENTRY %main (param.21: f32[512,2048], param.22: f32[512,2048]) -> f32[512,2048] {
  %param.24 = f32[512,2048]{1,0:T(8,128)} parameter(54), sharding={devices=[4,1]<=[4]}
  %param.23 = f32[512,2048]{1,0:T(8,128)} parameter(30), sharding={devices=[4,1]<=[4]}
  %param.22 = f32[512,2048]{1,0:T(8,128)} parameter(78), sharding={devices=[4,1]<=[4]}
  %slice-start.32 = ((f32[512,2048]{1,0:T(8,128)}), f32[128,2048]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.22), slice={[0:128], [0:2048]}
  %param.21 = f32[512,2048]{1,0:T(8,128)} parameter(5), sharding={devices=[4,1]<=[4]}
  %slice-start.33 = ((f32[512,2048]{1,0:T(8,128)}), f32[128,2048]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.22), slice={[128:256], [0:2048]}
  %slice-start.34 = ((f32[512,2048]{1,0:T(8,128)}), f32[128,2048]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.22), slice={[256:384], [0:2048]}
  %slice-start.35 = ((f32[512,2048]{1,0:T(8,128)}), f32[128,2048]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.22), slice={[384:512], [0:2048]}
  %slice-done.32 = f32[128,2048]{1,0:T(8,128)S(1)} slice-done(%slice-start.32)
  %slice-done.33 = f32[128,2048]{1,0:T(8,128)S(1)} slice-done(%slice-start.33)
  %slice-done.34 = f32[128,2048]{1,0:T(8,128)S(1)} slice-done(%slice-start.34)
  %slice-done.35 = f32[128,2048]{1,0:T(8,128)S(1)} slice-done(%slice-start.35)
  %custom-call.8 = f32[512,2048]{1,0:T(8,128)S(1)} custom-call(%slice-done.32, %slice-done.33, %slice-done.34, %slice-done.35), custom_call_target="ConcatBitcast"
  %fusion.42 = (f32[512,2048]{1,0:T(8,128)}, f32[512,2048]{1,0:T(8,128)}, f32[512,2048]{1,0:T(8,128)}) fusion(%param.21, %param.24, %custom-call.8, %param.23), kind=kLoop, calls=%fused_computation.42
  %copy-start = (f32[512,2048]{1,0:T(8,128)S(1)}, f32[512,2048]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%param.23)
  %copy-done = f32[512,2048]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  ROOT %tuple = (f32[512,2048]{1,0:T(8,128)}, f32[512,2048]{1,0:T(8,128)S(1)}) tuple(%fusion.42, %copy-done)
}
"""


def test_tpu_prefetches_count_once_and_vmem_not_at_all():
  # Slices: the gradient read once (4 MiB); the fusion: three operands read and three outputs
  # written in device memory (24 MiB), its VMEM operand not; the copy into VMEM: one read (4 MiB).
  assert compiled.moved_bytes(TPU) == 32 * MIB


def test_every_operand_and_output_in_device_memory_counts():
  gpu = """
ENTRY %main (a: f32[1024], b: bf16[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %b = bf16[1024]{0} parameter(1)
  %fusion = (f32[1024]{0}, u8[1024]{0}) fusion(%a, %b), kind=kLoop, calls=%f
  %gte = f32[1024]{0} get-tuple-element(%fusion), index=0
  ROOT %r = f32[1024]{0} negate(%gte)
}
"""
  # fusion: reads 4096 + 2048, writes 4096 + 1024; negate: reads 4096, writes 4096.
  assert compiled.moved_bytes(gpu) == 4096 + 2048 + 4096 + 1024 + 4096 + 4096


def test_a_quantized_step_that_compiles_slowly_fails_the_check():
  def row(case: str, seconds: float) -> compiled.Row:
    r = compiled.Row(case, "H100 1x1x4", "1 device", compile_s=seconds, state=MIB)
    r.alias = r.param_bytes + r.state
    return r

  slow = compiled.problems(row("4-bit moments, fused_step", 57.0))
  assert any(p.startswith("compiled in 57 s") for p in slow), slow
  assert not compiled.problems(row("4-bit moments, fused_step", 5.0))
  assert not compiled.problems(row("bf16 params, stochastic rounding", 57.0))


def test_the_compile_limit_names_cases_that_exist():
  names = {c.name for c in compiled.cases()}
  assert set(compiled.COMPILE_LIMITED) <= names, set(compiled.COMPILE_LIMITED) - names
  assert {n for n in names if "-bit moments" in n} == set(compiled.COMPILE_LIMITED)


def test_a_listed_row_whose_temporaries_grow_fails_the_check():
  key = ("8-bit moments", "TPU v5e 2x2", "FSDP/4")
  ceiling = compiled.OVER_TEMP[key]

  def row(temp_mib: float) -> compiled.Row:
    r = compiled.Row(*key, state=80 * MIB, temp=int(temp_mib * MIB))
    r.alias = r.param_bytes + r.state
    return r

  assert not compiled.problems(row(ceiling))  # above 1 % of the state, as listed
  grown = compiled.problems(row(1.2 * ceiling))
  assert any("OVER_TEMP's, measured" in p for p in grown), grown
  gone = compiled.problems(row(0.5))  # within 1 %: the list must shrink
  assert any("remove it from OVER_TEMP" in p for p in gone), gone
