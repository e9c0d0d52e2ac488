"""Learning-rate schedules and warmup: the shapes of loom's schedules, and what warmup does to a short run.

    python docs/heuristics/lr_schedules.py [--tiny] [--out DIR]

Left: the learning-rate multiplier of every `lr_scheduler_type` over 100 steps with 10 warmup steps, straight from
`loom.get_scheduler`. Right: held-out loss of a small Llama trained from the same weights on the same batches for
a fixed number of AdamW steps, by warmup fraction, schedule and peak learning rate.
"""
from __future__ import annotations

from _common import environment_note, one_thread, parse_args, pyplot, save, tiny_llama_config

SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "inverse_sqrt"]
FULL = dict(model=dict(hidden_size=128, intermediate_size=344, vocab_size=256), steps=80, batch=16, seq=64,
            warmups=[0.0, 0.02, 0.05, 0.1, 0.2, 0.3], schedules=["constant_with_warmup", "linear", "cosine"],
            lrs=[3e-3, 2e-2])
TINY = dict(model=dict(vocab_size=256), steps=4, batch=4, seq=16, warmups=[0.0, 0.25], schedules=["linear"],
            lrs=[1e-2])


def shapes(total: int = 100, warmup: int = 10) -> dict[str, list[float]]:
    import torch

    from loom.training import get_scheduler

    curves = {}
    for name in SCHEDULES:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        kwargs = {"num_cycles": 2} if name == "cosine_with_restarts" else None
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=kwargs)
        values = []
        for _ in range(total):
            values.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        curves[name] = values
    return curves


def batches(s: dict, count: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = s["model"]["vocab_size"]
    out = []
    for _ in range(count):
        ids = torch.empty(s["batch"], s["seq"], dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (s["batch"],), generator=g)
        for t in range(1, s["seq"]):  # next = 3*prev + 1 (mod vocab), with 10% noise
            noise = torch.randint(0, vocab, (s["batch"],), generator=g)
            ids[:, t] = torch.where(torch.rand(s["batch"], generator=g) < 0.1, noise, (3 * ids[:, t - 1] + 1) % vocab)
        out.append(ids)
    return out


def train(s: dict, schedule: str, warmup_ratio: float, lr: float, train_batches, eval_batches) -> float:
    import torch

    from loom.models.llama import LlamaForCausalLM
    from loom.training import get_scheduler

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**s["model"])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_scheduler(schedule, opt, num_warmup_steps=int(warmup_ratio * s["steps"]),
                          num_training_steps=s["steps"])
    for ids in train_batches:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=ids, labels=ids).loss.item() for ids in eval_batches) / len(eval_batches)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    s = TINY if args.tiny else FULL
    one_thread()
    curves = shapes()
    train_batches, eval_batches = batches(s, s["steps"], seed=0), batches(s, 4, seed=1)
    runs = []
    for lr in s["lrs"]:
        for schedule in s["schedules"]:
            for warmup in s["warmups"]:
                loss = train(s, schedule, warmup, lr, train_batches, eval_batches)
                runs.append({"lr": lr, "schedule": schedule, "warmup_ratio": warmup, "eval_loss": loss})
                print(runs[-1])
    plt = pyplot()
    fig, (ax_shape, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in curves.items():
        ax_shape.plot(values, label=name)
    ax_shape.set_xlabel("optimizer step (100 total, 10 warmup)")
    ax_shape.set_ylabel("learning rate / peak")
    ax_shape.legend(fontsize=7)
    for i, lr in enumerate(s["lrs"]):
        for schedule in s["schedules"]:
            pts = [r for r in runs if r["lr"] == lr and r["schedule"] == schedule]
            ax_loss.plot([r["warmup_ratio"] for r in pts], [r["eval_loss"] for r in pts], "o-" if i else "s--",
                         label=f"{schedule}, lr {lr:g}")
    ax_loss.set_xlabel("warmup fraction of the run")
    ax_loss.set_ylabel(f"held-out loss after {s['steps']} steps")
    ax_loss.legend(fontsize=7)
    fig.suptitle(f"Llama {s['model']}, batch {s['batch']}x{s['seq']}, 1 torch thread — {environment_note()}",
                 fontsize=8)
    save(fig, "lr_schedules", args.out, {"settings": s, "shapes": curves, "runs": runs})


if __name__ == "__main__":
    main()
