"""Convert an LPT authors' checkpoint into a HF ViTModel folder and an LPT adapter folder (phase 2, or phase 1).

    python examples/convert_authors_checkpoint.py --checkpoint LPT_places.pth --output_dir converted \
        --labels categories_places365.txt --dataset places_lt

writes converted/base (ViTModel, LayerNorm eps 1e-5) and converted/adapter (LPT), each with the authors' evaluation
preprocessing in preprocessor_config.json. The authors' released `LPT_places.pth` holds their full (phase-2) model
and gives a phase-2 adapter; a checkpoint of their phase-1 model (shared prompts and head, no group pool) gives a
phase-1 adapter, from which `examples/train_lpt.py --phase 2 --init_from converted/adapter` trains phase 2. Load them
with

    import lpt_peft
    from peft import PeftModel
    from transformers import ViTModel
    model = PeftModel.from_pretrained(ViTModel.from_pretrained("converted/base", add_pooling_layer=False),
                                      "converted/adapter")

Nothing is written unless the whole file converts; existing non-empty output folders are kept unless --overwrite, and
output folders inside one another, or holding the checkpoint itself, are refused (with or without --overwrite).
The checkpoint is read with torch.load(weights_only=True) first; if it holds other Python objects, the script stops
and explains. --trust_pickle then allows a full unpickle, which runs code stored in the file: only for trusted files.
A truncated, corrupt or non-torch file is reported as "damaged or not a PyTorch checkpoint". See docs/interop.md.
"""

import argparse
import json
import sys
from pathlib import Path

import lpt_peft  # noqa: F401  (registers LPT with peft)
from lpt_peft.cli import cli_entry
from lpt_peft.interop.authors import convert_authors_checkpoint, read_labels_file

FLAGS = {
    "num_attention_heads": "--num_heads",
    "trust_pickle": "--trust_pickle",
    "strict": "--no_strict",
    "overwrite": "--overwrite",
    "shared_layers": "--shared_layers",
    "num_groups": "--num_groups",
    "group_prompt_length": "--group_prompt_length",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="The authors' .pth file, e.g. LPT_places.pth.")
    parser.add_argument("--output_dir", default=None, help="Writes <output_dir>/base and <output_dir>/adapter.")
    parser.add_argument("--base_dir", default=None, help="Backbone folder (overrides <output_dir>/base).")
    parser.add_argument("--adapter_dir", default=None, help="Adapter folder (overrides <output_dir>/adapter).")
    parser.add_argument("--overwrite", action="store_true", help="Replace non-empty output folders.")
    parser.add_argument("--num_heads", type=int, default=None, help="Attention heads (default hidden size / 64).")
    parser.add_argument("--top_k", type=int, default=None, help="Groups per image (default: checkpoint's, else 2).")
    parser.add_argument(
        "--labels", default=None, help="Class names: one per line, or 'name index' lines (categories_places365.txt)."
    )
    parser.add_argument("--dataset", default=None, help="Data set name for the model card, e.g. places_lt.")
    parser.add_argument(
        "--base_model_name_or_path", default=None, help="Base recorded in the adapter (e.g. a Hub id you will use)."
    )
    parser.add_argument("--trust_pickle", action="store_true", help="Allow a code-executing unpickle (trusted files).")
    parser.add_argument("--no_strict", action="store_true", help="Ignore unknown keys (with a warning).")
    pool = parser.add_argument_group("phase-1 checkpoints only: the group pool that phase-2 training will start from")
    pool.add_argument("--shared_layers", type=int, default=None, help="K: layers 1..K without group prompts (L / 2).")
    pool.add_argument("--num_groups", type=int, default=None, help="Prompt groups in the pool (20).")
    pool.add_argument("--group_prompt_length", type=int, default=None, help="Prompts per layer in each group (10).")
    args = parser.parse_args(argv)
    if args.output_dir is None and (args.base_dir is None or args.adapter_dir is None):
        parser.error("pass --output_dir, or both --base_dir and --adapter_dir.")
    return args


@cli_entry(flags=FLAGS)
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    base_dir = Path(args.base_dir or Path(args.output_dir) / "base")
    adapter_dir = Path(args.adapter_dir or Path(args.output_dir) / "adapter")
    id2label = read_labels_file(args.labels) if args.labels else None
    result = convert_authors_checkpoint(
        args.checkpoint,
        base_dir,
        adapter_dir,
        num_attention_heads=args.num_heads,
        top_k=args.top_k,
        id2label=id2label,
        dataset=args.dataset,
        trust_pickle=args.trust_pickle,
        strict=not args.no_strict,
        base_model_name_or_path=args.base_model_name_or_path,
        overwrite=args.overwrite,
        shared_layers=args.shared_layers,
        num_groups=args.num_groups,
        group_prompt_length=args.group_prompt_length,
    )
    print("Stored config:")
    print(json.dumps(result.stored_config, indent=2, default=str, sort_keys=True))
    print(f"Stored val_acc: {result.val_acc}")
    vit = result.model.get_base_model().config
    lpt = result.model.peft_config["default"]
    print(
        f"Backbone: hidden {vit.hidden_size}, {vit.num_hidden_layers} layers, {vit.num_attention_heads} heads, "
        f"patch {vit.patch_size}, {vit.image_size} px, LayerNorm eps {vit.layer_norm_eps}"
    )
    # Layers are counted 1..L, as in the model card and docs/interop.md.
    pool = (
        f"{lpt.num_groups} groups x {lpt.group_prompt_length} prompts for layers "
        f"{lpt.shared_layers + 1}..{lpt.num_hidden_layers}, top-{lpt.top_k}"
    )
    if result.phase == 1:
        pool = f"phase-1 model (no group pool in the file); pool for phase-2 training: {pool}, not trained"
    print(f"LPT phase {result.phase}: {lpt.num_labels} classes, {lpt.prompt_length} shared prompts per layer; {pool}")
    print(f"Wrote {base_dir} and {adapter_dir}")


if __name__ == "__main__":
    main()
