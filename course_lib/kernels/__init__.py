"""Speed-only kernels, kept apart from the lesson files.

Each module here computes what a plain PyTorch formula in a lesson file computes, is used from
that file through one visible switch (nanoGPT's ``if self.flash:``), is tested against the plain
formula, and stays only while a row of ``benchmarks/`` shows that it pays:

- :mod:`course_lib.kernels.lora`: the fused LoRA nodes behind ``LinearWithLoRA.fused``;
- :mod:`course_lib.kernels.nf4`: the fast NF4 path of :mod:`course_lib.model.nf4`.
"""
