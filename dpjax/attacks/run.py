"""``dpjax attack``: run one attack on digits and write ``attack_<name>.json`` and
``attack_<name>.png`` under ``--out`` (the arguments are checked in
:mod:`dpjax.cli` before this module is imported)."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from dpjax.attacks import gradient_sign as fgsm_
from dpjax.attacks import targets as targets_
from dpjax.attacks import transfer as transfer_
from dpjax.attacks.blackbox import BlackBoxSettings, blackbox_attack, queries_needed
from dpjax.attacks.oracle import Oracle

PUBLISHED = {  # MNIST, the papers' numbers (ε_FGSM = 0.3)
    "blackbox": "MNIST remote systems: DNN 84.24% misclassified after 6,400 queries; logistic regression "
                "96.19% after 800; an unknown model 97.72% after 2,000 (Papernot et al. 2017)",
    "transfer": {"dnn": {"dnn": 0.3827, "dt": 0.7931, "knn": 0.0836}, "lr": {"lr": 0.9164, "svm": 0.9143}},
}
EPS_GRID = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3)


def _target(args, data):
    if args.target == "dp":
        return targets_.private_target(args.privacy_epsilon, data, seed=args.seed)
    return targets_.train_target(args.target, data["x_train"], data["y_train"], seed=args.seed)


def run_fgsm(args, data) -> dict:
    target = _target(args, data)
    x, y = data["x_test"], data["y_test"]
    curve = []
    for e in sorted({*EPS_GRID, args.eps}):
        adv = fgsm_.fgsm(target.logits, x, y, e, steps=args.steps)
        curve.append({"eps": e, "fgsm": fgsm_.misclassification_rate(target.predict, adv, y),
                      "random_sign": fgsm_.misclassification_rate(target.predict, fgsm_.random_sign(x, e, seed=args.seed),
                                                                  y)})
    at = next(c for c in curve if c["eps"] == args.eps)
    print(f"target {target.name}: clean error {curve[0]['fgsm']:.4f}; FGSM eps={args.eps:g} "
          f"({args.steps} step{'s' if args.steps > 1 else ''}) misclassifies {at['fgsm']:.4f} of the test set "
          f"(random signs of the same size: {at['random_sign']:.4f})")
    return {"target": target.name, "steps": args.steps, "eps": args.eps, "curve": curve}


def _blackbox_settings(args) -> BlackBoxSettings:
    return BlackBoxSettings(rounds=args.rounds, step=args.lam, reservoir=args.reservoir, eps=args.eps,
                            flip_every=None if args.no_flip else 3)


def run_blackbox(args, data) -> dict:
    target = _target(args, data)
    x, y = data["x_test"], data["y_test"]
    x0, x_eval, y_eval = x[:args.initial], x[args.initial:], y[args.initial:]
    oracle = Oracle(target.predict, budget=args.query_budget)
    settings = _blackbox_settings(args)
    result = blackbox_attack(oracle, x0, evaluate=target.predict, x_eval=x_eval, y_eval=y_eval,
                             settings=settings, seed=args.seed, progress=not args.quiet)
    rounds = [r.__dict__ for r in result.rounds]
    for r in rounds:
        print(f"round {r['round']}: {r['queries']:>6} queries, substitute agrees with the target on "
              f"{r['agreement']:.4f}, FGSM eps={args.eps:g} on it misclassified by the target: "
              f"{r['misclassification']:.4f}")
    random = fgsm_.misclassification_rate(target.predict, fgsm_.random_sign(x_eval, args.eps, seed=args.seed), y_eval)
    print(f"(random signs of the same size: {random:.4f}; queries planned without a budget: "
          f"{queries_needed(args.initial, settings)}, spent {result.queries} of {args.query_budget})")
    return {"target": target.name, "eps": args.eps, "initial": args.initial, "query_budget": args.query_budget,
            "rounds": rounds, "random_sign": random, "published": PUBLISHED["blackbox"]}


def run_transfer(args, data) -> dict:
    report = transfer_.transferability(data, eps=args.eps, seed=args.seed, progress=not args.quiet)
    print(f"FGSM eps={args.eps:g} crafted on the source (rows), misclassified by the target (columns):")
    print(format_matrix(report))
    return dict(report, published_mnist_eps_0_3=PUBLISHED["transfer"])


def format_matrix(report: dict) -> str:
    targets = report["targets"]
    lines = ["source \\ target " + "".join(f"{t:>8}" for t in targets)]
    for s in report["sources"]:
        lines.append(f"{s:<16}" + "".join(f"{100 * report['matrix'][s][t]:>7.1f}%" for t in targets))
    lines.append(f"{'(clean error)':<16}" + "".join(f"{100 * report['clean_error'][t]:>7.1f}%" for t in targets))
    return "\n".join(lines)


def run_privacy(args, data) -> dict:
    sweep = transfer_.PrivacySweep(fgsm_eps=tuple(sorted({0.0, 0.05, 0.1, 0.2, args.eps})), seed=args.seed,
                                   blackbox=BlackBoxSettings(rounds=min(args.rounds, 4), step=args.lam,
                                                             eps=args.eps))
    rows = transfer_.private_vs_nonprivate(data, sweep, progress=not args.quiet)
    key = str(args.eps)
    for r in rows:
        print(f"{r['target']:<16} clean accuracy {r['clean_accuracy']:.4f}; eps_FGSM={args.eps:g}: white-box "
              f"{r['whitebox'][key]:.4f}, black-box {r['blackbox'][key]:.4f} ({r['blackbox_queries']} queries)")
    return {"eps": args.eps, "rows": rows}


RUNNERS = {"fgsm": run_fgsm, "blackbox": run_blackbox, "transfer": run_transfer, "privacy": run_privacy}


def run_cli(args) -> int:
    from dpjax import datasets

    data = datasets.load_digits()
    t = time.perf_counter()
    report = RUNNERS[args.attack](args, data)
    report.update(attack=args.attack, seconds=time.perf_counter() - t, data="digits (sklearn), 1,437 train / 360 test")
    base = os.path.join(args.out, f"attack_{args.attack}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(report, base + ".png")
    print(f"wrote {base}.json and {base}.png ({report['seconds']:.0f} s)")
    return 0


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    kind = report["attack"]
    if kind == "fgsm":
        eps = [c["eps"] for c in report["curve"]]
        ax.plot(eps, [100 * c["fgsm"] for c in report["curve"]], "o-", label="FGSM")
        ax.plot(eps, [100 * c["random_sign"] for c in report["curve"]], "s--", label="random signs, same size")
        ax.set_xlabel("ε (L∞, inputs in [0, 1])")
        ax.set_title(f"white-box FGSM against {report['target']} (digits)")
    elif kind == "blackbox":
        q = [r["queries"] for r in report["rounds"]]
        ax.plot(q, [100 * r["misclassification"] for r in report["rounds"]], "o-", label="target misclassifies")
        ax.plot(q, [100 * r["agreement"] for r in report["rounds"]], "s--", label="substitute agrees with target")
        ax.set_xscale("log")
        ax.set_xticks(q, [f"{v:,}" for v in q])
        ax.minorticks_off()
        ax.set_xlabel("oracle queries")
        ax.set_title(f"black-box attack on {report['target']}, FGSM ε = {report['eps']:g}")
    elif kind == "transfer":
        m = np.array([[100 * report["matrix"][s][t] for t in report["targets"]] for s in report["sources"]])
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100)
        ax.set_xticks(range(len(report["targets"])), report["targets"])
        ax.set_yticks(range(len(report["sources"])), report["sources"])
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", color="w" if m[i, j] < 60 else "k")
        fig.colorbar(im, label="% misclassified")
        ax.set_xlabel("target")
        ax.set_ylabel("source (FGSM crafted on)")
        ax.set_title(f"transferability, FGSM ε = {report['eps']:g} (digits)")
    else:
        for r in report["rows"]:
            eps = [float(e) for e in r["whitebox"]]
            line, = ax.plot(eps, [100 * v for v in r["whitebox"].values()], "o-", label=f"{r['target']} white-box")
            ax.plot(eps, [100 * v for v in r["blackbox"].values()], "s--", color=line.get_color(), alpha=0.7,
                    label=f"{r['target']} black-box")
        ax.set_xlabel("ε_FGSM (L∞)")
        ax.set_title("private and non-private targets (digits CNN)")
        ax.legend(fontsize=7)
    if kind != "transfer":
        ax.set_ylabel("misclassified or agreeing (%)" if kind == "blackbox" else "misclassified (%)")
        ax.grid(alpha=0.3)
        if kind != "privacy":
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
