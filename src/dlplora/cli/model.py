"""`dlp-lora model info`: load the backbone and print its facts."""

from __future__ import annotations

import time

from .common import print_json


def cmd_model_info(args) -> None:
    from ..backbone import load_backbone

    t0 = time.time()
    model, tok, info = load_backbone(args.model)
    load_s = time.time() - t0
    out = info.to_dict() | {"load_seconds": round(load_s, 2)}
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
    mi = m.add_parser("info", help="load the backbone (caching the embedded one) and print its facts",
                      description="Load the backbone and print its path, architecture, size and fingerprint. "
                                  "The first run converts the embedded GGUF to a safetensors cache.")
    mi.add_argument("--model", help=model_help)
    mi.add_argument("--smoke", type=int, default=0, metavar="N", help="also generate N tokens as a smoke check")
    mi.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    mi.set_defaults(func=cmd_model_info)
