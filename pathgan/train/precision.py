"""The mixed precision of a run, decided in one place for ``pathgan train`` and launch/train.sh.

``auto`` means bf16 on GPUs that compute in bf16 natively (compute capability 8.0 and newer:
A100, H100, L40, RTX 30xx ...), fp16 with loss scaling on older GPUs (V100 is 7.0, T4 7.5) and
fp32 on the CPU. ``torch.cuda.is_bf16_supported()`` is not asked: it counts emulation and says
True on 7.x GPUs, where bf16 runs slowly and the fp16 path would never be chosen.

``python -m pathgan.train.precision`` prints this machine's GPU count and ``auto``'s choice;
launch/train.sh asks it rather than deciding itself.
"""

import torch

BF16_MIN_CAPABILITY = (8, 0)


def resolve_mixed_precision(requested: str) -> str:
    """``auto`` -> ``bf16``, ``fp16`` or ``no`` for this machine; any other value is kept.

    Every visible GPU must qualify for bf16, so that all ranks of a node choose alike.
    """
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return "bf16" if min(capabilities) >= BF16_MIN_CAPABILITY else "fp16"


def main() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(gpus, resolve_mixed_precision("auto"))


if __name__ == "__main__":
    main()
