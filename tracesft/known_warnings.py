"""Warnings that every run printed and that say nothing about the run, silenced one by one.

Each filter matches one message from one place, so any other warning (from these libraries too)
still shows. Where the cause is ours it is fixed where it arises instead (pinned memory: the
trainer pins host memory only on CUDA, `tracesft.train.training`).
"""

from __future__ import annotations

import logging
import warnings

# peft 0.21 (`PeftModel.__init__`) and trl 1.16 read `model.is_gradient_checkpointing`, which
# transformers 5.24 renamed to `is_activation_checkpointing`; the old name still works and warns
# on every read. Nothing for a user to do: it goes away when peft and trl read the new name.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning, module=r"transformers\."
)


class _NoHubKernelNotice(logging.Filter):
    """bitsandbytes 0.50, on a CPU with AVX512-BF16, tries to fetch an optional faster 4-bit kernel
    from the Hugging Face hub at import and logs a warning when it cannot. 4-bit runs only on CUDA
    here, so the CPU kernel is never used."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())
