"""Command-line options of the label-noise simulation, shared by ``jobs/simulation.py`` and
``raymimic simulate``. Import-light (argparse only): torch loads inside :func:`run`."""
from __future__ import annotations

import argparse

METHODS = ("sgd", "grad-mimic", "grad-norm", "agra", "rho", "grad-match")
DEFAULT_OUTPUT = "simulation-results"

DESCRIPTION = """\
The paper's label-noise simulation, offline and on the CPU in a few minutes.

1. Train a reference model on the clean labels.
2. For each noise level, flip that fraction of the training labels to a uniformly chosen
   WRONG class and train one model per weighting method (plain SGD, Grad-Mimic, GraNd,
   AGRA, RHO-loss, Grad-Match). Grad-Mimic scores each sample by how well its gradient
   points from the current head weights towards the reference model's head weights and
   re-weights the batch with softmax(score / tau).
3. Every sample's weight at every step is recorded in the score-table layout, and the
   Stage-2 binarizers (threshold, k-means, GMM) and their ensemble vote flag samples as
   noisy; precision/recall/F1 against the true noise mask are reported.

Writes OUTPUT/results.json and OUTPUT/results.md (test accuracy and detection F1 tables).

Defaults and why (sweep in raymimic/sim/README.md): the model is a frozen random ReLU
feature map with a trainable head (the analogue of the paper's linear probing on a frozen
encoder); the mimic layer is the head weight. The paper's lr 1e-4 for 5 epochs leaves this
head far from converged on 1,347 digits (reference accuracy 86%); in that regime noise
costs plain SGD little and Grad-Mimic (and even RHO with the clean reference) lose at
noise 0.4-0.5, so the defaults train 10 epochs at lr 3e-3 (reference 97%). The mimic
scores here lie within about +-1, so the paper's tau = 1 down-weights noisy samples only
mildly; tau 0.1-0.3 gives the best accuracy at noise 0.5-0.6 with F1 >= 0.99, and 0.3 is
the milder of the two. With --model mlp use --reweight-all: re-weighting only the head
lets the encoder learn the noise from the plain gradient.
"""

EPILOG = """\
examples:
  %(prog)s                                   # digits, noise 0.4 0.5 0.6, all methods
  %(prog)s --methods sgd grad-mimic --noise 0.5 --output /tmp/sim
  %(prog)s --dataset cifar10 --data-dir ~/data --max-train 5000 --model probe
  %(prog)s --tau 1.0 --lr 1e-4 --epochs 5    # the paper's optimiser settings
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the simulation's options to ``parser`` (the one definition both entry points use)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", help="digits (ships with scikit-learn, default) or a torchvision dataset on disk: cifar10, cifar100, mnist, fashion-mnist, kmnist, svhn")
    data.add_argument("--data-dir", default=None, help="folder torchvision stored the dataset in (read with download=False); needed for every dataset but digits")
    data.add_argument("--max-train", type=int, default=None, help="use a random subset of this many training samples (large datasets on a small machine)")
    data.add_argument("--max-test", type=int, default=None, help="use a random subset of this many test samples")
    data.add_argument("--noise", type=float, nargs="+", default=[0.4, 0.5, 0.6], help="symmetric label-noise rates, fraction of training labels flipped to a wrong class (default: 0.4 0.5 0.6)")
    data.add_argument("--seed", type=int, default=0, help="seed of the split, the noise, the model initialisation and the batch order (default: 0)")

    train = parser.add_argument_group("training")
    train.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help=f"weighting methods to compare: {' '.join(METHODS)} (default: all)")
    train.add_argument("--model", default="probe", choices=("probe", "linear", "mlp"), help="probe: frozen random-feature encoder + trainable head (linear probing, default); linear: head on the pixels; mlp: every layer trained (fine-tuning)")
    train.add_argument("--hidden", type=int, default=256, help="width of the encoder's feature map for probe/mlp (default: 256)")
    train.add_argument("--epochs", type=int, default=10, help="training epochs of every run and of the reference (default: 10; the paper used 5)")
    train.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3; the paper used 1e-4)")
    train.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (default: 1e-5, as in the paper)")
    train.add_argument("--batch-size", type=int, default=32, help="batch size B (default: 32, as in the paper)")
    train.add_argument("--tau", type=float, default=0.3, help="softmax temperature of Grad-Mimic, GraNd and RHO (default: 0.3; the paper's default is 1.0)")
    train.add_argument("--score-kind", default="proj", choices=("proj", "cos"), help="mimic score: projection on the reference direction (default) or its cosine")
    train.add_argument("--reweight-all", action="store_true", help="re-weight the gradient of every layer (backward of sum_i w_i l_i), not only the head's")
    train.add_argument("--vote-rule", default="majority", help="ensemble rule over epochs and binarizers: majority (default), all, any or a fraction in (0, 1]")

    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; the models are tiny, so more threads only add synchronisation overhead)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"folder for results.json and results.md (default: ./{DEFAULT_OUTPUT})")
    parser.add_argument("--save-scores", action="store_true", help="also write each run's score rows to OUTPUT/scores/<noise>_<method>.parquet")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the simulation described by the parsed options and print where it wrote what."""
    import torch

    from raymimic.sim.simulate import simulate
    from raymimic.sim.train import TrainConfig

    for rate in args.noise:
        if not 0 <= rate < 1:
            raise SystemExit(f"--noise {rate}: a noise rate is a fraction in [0, 1)")
    for name in ("epochs", "batch_size", "hidden"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0 or args.tau <= 0:
        raise SystemExit(f"--lr and --tau must be positive, got lr {args.lr}, tau {args.tau}")
    config = TrainConfig(
        model=args.model, hidden=args.hidden, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        batch_size=args.batch_size, tau=args.tau, score_kind=args.score_kind, reweight_all=args.reweight_all, seed=args.seed,
    )
    if args.threads <= 0:
        raise SystemExit(f"--threads must be positive, got {args.threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results, json_path, md_path = simulate(
            dataset=args.dataset, data_dir=args.data_dir, noise_levels=args.noise, methods=args.methods, config=config,
            output_dir=args.output, max_train=args.max_train, max_test=args.max_test, vote_rule=args.vote_rule,
            save_scores=args.save_scores, log=print,
        )
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process keep their setting
    with open(md_path) as f:
        print(f.read())
    print(f"wrote {json_path}")
    print(f"wrote {md_path}")
    return 0
