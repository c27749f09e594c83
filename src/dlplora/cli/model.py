"""`dlp-lora model info`: the backbone's facts (read from its files; loaded only for --smoke or a hub id)."""

from __future__ import annotations

import time

from .common import print_json


def cmd_model_info(args) -> None:
    from ..backbone import load_backbone, read_backbone_info

    info = None if args.smoke else read_backbone_info(args.model)  # no torch, no weights: a fraction of a second
    if info is not None:
        out = info.to_dict()
    else:
        t0 = time.time()
        model, tok, info = load_backbone(args.model)
        out = info.to_dict() | {"load_seconds": round(time.time() - t0, 2)}
    if args.smoke:
        import torch

        from ..tasks import chat_prompt

        prompt = chat_prompt(tok, "Name a primary colour.")
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=args.smoke, do_sample=False, pad_token_id=tok.pad_token_id)
        out["smoke_completion"] = tok.decode(gen[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        print_json(out)
    else:
        for k, v in out.items():
            print(f"{k:>18}: {v}")


def register(sub, model_help: str) -> None:
    m = sub.add_parser("model", help="inspect the backbone").add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    mi = m.add_parser("info", help="print the backbone's facts (caching the embedded one)",
                      description="Print the backbone's path, architecture, size and fingerprint, read from its "
                                  "config and weight headers (loaded with --smoke, or for a hub id). The first run "
                                  "converts the embedded GGUF to a safetensors cache.")
    mi.add_argument("--model", help=model_help)
    mi.add_argument("--smoke", type=int, default=0, metavar="N", help="also generate N tokens as a smoke check")
    mi.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    mi.set_defaults(func=cmd_model_info)
