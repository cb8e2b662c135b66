"""``pathgan train`` that also saves each rank's final parameters, for tests that compare ranks.

Launched like ``pathgan train`` (``--config CONFIG [--resume ...] [key=value ...]``), e.g. by
launch/train.sh with ``PATHGAN_TRAIN_MODULE=rank_params_trainer`` and tests/ on PYTHONPATH. Each
rank writes ``run.dir/params-rank<RANK>.safetensors``: every parameter of the generator and the
discriminators (not the BatchNorm statistics, which are per rank by design).
"""

import os
import sys

from safetensors.torch import save_file

from pathgan.cli import build_parser
from pathgan.config import load_config
from pathgan.train.loop import train


def main() -> None:
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    result = train(load_config(args.config, args.overrides), resume=args.resume)
    networks = {"generator": result.generator, **result.discriminators}
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name, network in networks.items()
               for key, value in network.named_parameters()}
    save_file(tensors, result.run_dir / f"params-rank{os.environ.get('RANK', '0')}.safetensors")


if __name__ == "__main__":
    main()
