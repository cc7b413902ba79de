"""Classify image files with a saved LPT adapter and print the top-k labels with their scores.

    python examples/predict.py --adapter converted/adapter --base converted/base photos/ cat.jpg --top_k 5 \
        --json_out predictions.json --csv_out predictions.csv

Arguments are image files and/or folders (their image files, sorted; --recursive descends into subfolders).
--adapter and --base take local folders or Hub ids; --base defaults to the base recorded in the adapter (an adapter
trained on the built-in `demo` or `tiny-random` backbone records that name and needs no --base).
Preprocessing comes from the adapter's preprocessor_config.json when it has one, else LPT's defaults; --image_size,
--resize_size, --mean and --std override it. Scores are softmax(logit_scale * cosine logits), logit_scale from the
adapter config (20 by default).

An unreadable or missing image stops the run with an error naming the file; with --skip_bad it is reported with a
warning, listed with its error in the JSON / CSV output, and the other images are still classified.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import lpt_peft  # noqa: F401  (registers LPT with peft)
from lpt_peft.cli import check_output_file, cli_entry, write_output_file
from lpt_peft.inference import load_classifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="Image files and/or folders of images.")
    parser.add_argument("--adapter", required=True, help="LPT adapter folder or Hub id.")
    parser.add_argument(
        "--base", default=None, help="Base ViT folder, Hub id, 'demo' or 'tiny-random' (default: the adapter's base)."
    )
    parser.add_argument("--top_k", type=int, default=5, help="Labels per image.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
    parser.add_argument("--recursive", action="store_true", help="Also take images from subfolders.")
    parser.add_argument("--skip_bad", action="store_true", help="Skip unreadable images (with a warning).")
    parser.add_argument("--json_out", default=None, help="Write all predictions to this JSON file.")
    parser.add_argument("--csv_out", default=None, help="Write image,rank,label,score,error rows to this CSV file.")
    parser.add_argument("--image_size", type=int, default=None, help="Override: crop size.")
    parser.add_argument("--resize_size", type=int, default=None, help="Override: square resize before the crop.")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="Override: normalisation mean.")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="Override: normalisation std.")
    return parser.parse_args(argv)


def collect_images(paths: list[str], recursive: bool) -> list[str]:
    """Expand folders into their image files (sorted); keep files as given. Missing paths are an error."""
    files = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(
                p
                for p in (path.rglob("*") if recursive else path.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise FileNotFoundError(
                    f"Folder {entry!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                    + ("" if recursive else "; pass --recursive to search its subfolders")
                    + "."
                )
            files.extend(str(p) for p in found)
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"{entry!r} is neither an image file nor a folder.")
    return files


@cli_entry(flags={"base_model": "--base", "image_size": "--image_size", "on_error": "--skip_bad"})
def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_output_file(args.json_out, "--json_out")
    check_output_file(args.csv_out, "--csv_out")
    files = collect_images(args.images, args.recursive)
    classifier = load_classifier(
        args.base,
        args.adapter,
        device=args.device,
        image_size=args.image_size,
        resize_size=args.resize_size,
        mean=args.mean,
        std=args.std,
        batch_size=args.batch_size,
    )
    predictions = classifier(files, top_k=args.top_k, on_error="skip" if args.skip_bad else "raise")

    records = []
    for index, (file, prediction) in enumerate(zip(files, predictions)):
        if prediction is None:
            records.append(
                {"image": file, "predictions": [], "error": classifier.last_errors.get(index, "unreadable")}
            )
            print(f"{file}: skipped ({records[-1]['error']})")
            continue
        records.append({"image": file, "predictions": prediction})
        print(file)
        for rank, item in enumerate(prediction, start=1):
            print(f"  {rank}. {item['label']}  {item['score']:.4f}")

    if args.json_out:
        text = json.dumps(records, indent=2) + "\n"
        write_output_file(args.json_out, "--json_out", lambda handle: handle.write(text))
    if args.csv_out:
        write_output_file(args.csv_out, "--csv_out", lambda handle: write_csv(handle, records))
    skipped = sum("error" in r for r in records)
    if skipped:
        print(f"{skipped} of {len(records)} images could not be read and were skipped.", file=sys.stderr)
    return records


def write_csv(handle, records: list[dict]) -> None:
    writer = csv.writer(handle)
    writer.writerow(["image", "rank", "label", "score", "error"])
    for record in records:
        if "error" in record:
            writer.writerow([record["image"], "", "", "", record["error"]])
        for rank, item in enumerate(record["predictions"], start=1):
            writer.writerow([record["image"], rank, item["label"], f"{item['score']:.6f}", ""])


if __name__ == "__main__":
    main()
