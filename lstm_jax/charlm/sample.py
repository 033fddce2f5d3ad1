"""Generate text from a trained run; the checkpoint holds the config and vocabulary.

    lstm-jax-sample --checkpoint runs/char-lstm --prime "My fellow Americans" --temperature 0.5
    lstm-jax-sample --checkpoint runs/char-lstm --which best --temperature 0.2 0.5 1.0 --length 300
    lstm-jax-sample --keras-weights lesson.weights.h5 --vocab state_union --prime "My fellow Americans"

``--keras-weights`` samples from the lesson's own Keras model (LSTM + Dense + softmax, saved with
``model.save_weights``; Keras 3 ``.weights.h5`` or Keras 2 ``.h5``), its vocabulary the sorted
distinct characters of the ``--vocab`` text, as the lesson built it. ``--window 40`` draws each
character from the last 40 only, from a zero state, as the lesson's own sampling loop did (the
prime needs 40 characters then).

(``python sample.py ...`` in a clone of the repository runs the same.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys

import jax

from lstm_jax.charlm.checkpoint import load_run, silence_background_errors
from lstm_jax.charlm.data import Vocabulary, load_corpus
from lstm_jax.charlm.sampling import check_sampling_args, check_window, default_max_bytes, generate, generate_stream
from lstm_jax.core.errors import ConfigError, LstmJaxError

# Library argument names -> this script's flags, for error messages (LstmJaxError.in_words_of).
FLAGS = {"temperatures": "--temperature", "length": "--length", "top_k": "--top-k", "top_p": "--top-p",
         "prime": "--prime", "run_dir": "--checkpoint", "drop_unknown=True": "--drop-unknown",
         "path": "--keras-weights", "vocab": "--vocab", "corpus": "--vocab", "window": "--window"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder written by lstm-jax-train (train.py)")
    source.add_argument("--keras-weights", metavar="FILE",
                        help="the lesson's Keras model instead: the file its model.save_weights wrote (needs --vocab)")
    p.add_argument("--vocab", metavar="CORPUS",
                   help="with --keras-weights: the text the Keras model was trained on ('state_union', a .txt file "
                        "or folder); its sorted distinct characters are the vocabulary")
    p.add_argument("--which", default="latest", help="'latest', 'best' or a step number [latest]")
    p.add_argument("--prime", default="\n", help="text to start from; run through the model first [newline]")
    p.add_argument("--drop-unknown", action="store_true", help="drop prime characters outside the vocabulary")
    p.add_argument("--temperature", type=float, nargs="+", default=[0.5], help="one or more; 0 = greedy [0.5]")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest characters; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--length", type=int, default=500, help="characters to generate per sample [500]")
    p.add_argument("--num-samples", type=int, default=1, help="samples per temperature, generated as one batch")
    p.add_argument("--window", type=int, default=0,
                   help="draw each character from the model run afresh over the last N characters (the lesson's "
                        "Keras loop: 40; the prime needs N); 0 = carry the state on [0]")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def keras_model(path: str, corpus: str | None):
    """``(model, params, vocab)`` of the lesson's Keras weights file, the vocabulary from ``corpus``."""
    from lstm_jax.charlm.keras_seed import from_keras_seed

    if corpus is None:
        raise ConfigError("--keras-weights needs --vocab: the text the Keras model was trained on ('state_union', "
                          "a .txt file or folder), since the weights file records no vocabulary.")
    vocab = Vocabulary.from_text(*(d.text for d in load_corpus(corpus).documents))
    return from_keras_seed(path, vocab)


@contextlib.contextmanager
def interrupt_between_chunks():
    """Ctrl-C while streaming takes effect at the next chunk (64 characters): the handler only
    notes it, and the loop raises ``KeyboardInterrupt`` between chunks, never inside a JAX call or
    a write. (Raised wherever the signal landed, it once left sample.py still running 60 s after
    Ctrl-C, in one CI run of many.)"""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None) -> int:
    logging.getLogger("absl").setLevel(logging.ERROR)
    silence_background_errors()
    args = parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}.")
        temps = [t for t in args.temperature for _ in range(args.num_samples)]
        check_sampling_args(temps, args.length, args.top_k, args.top_p)
        if args.which not in ("latest", "best") and not args.which.isdigit():
            raise ConfigError(f"--which must be 'latest', 'best' or a step number, got {args.which!r}.")
        which = args.which if args.which in ("latest", "best") else int(args.which)
        if args.keras_weights is not None:
            model, params, vocab = keras_model(args.keras_weights, args.vocab)
        else:
            if args.vocab is not None:
                raise ConfigError("--vocab goes with --keras-weights only: a --checkpoint run holds its vocabulary.")
            model, params, vocab, meta = load_run(args.checkpoint, which)
            for note in meta["restore_notes"]:
                print(f"warning: {note}", file=sys.stderr)
        prime = vocab.encode(args.prime, drop_unknown=args.drop_unknown, what="prime text")
        check_window(args.window, len(prime))
        key = jax.random.PRNGKey(args.seed)
        if len(temps) == 1:  # stream a single sample to the terminal as it is produced, any length
            sys.stdout.write(vocab.decode(prime))
            with interrupt_between_chunks() as interrupted:
                for chunk in generate_stream(model, params, prime, temps, args.length, key, top_k=args.top_k,
                                             top_p=args.top_p, chunk=64, window=args.window):
                    sys.stdout.write(vocab.decode(chunk[0]))
                    sys.stdout.flush()
                    if interrupted():
                        raise KeyboardInterrupt
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            if 4 * len(temps) * args.length > default_max_bytes():
                raise ConfigError(f"--length {args.length} for {len(temps)} samples does not fit in memory; "
                                  "ask for one sample (one --temperature, --num-samples 1) to stream it.")
            rows = generate(model, params, prime, temps, args.length, key, top_k=args.top_k, top_p=args.top_p,
                            window=args.window)
            for t, row in zip(temps, rows):
                print(f"----- temperature {t}:\n{vocab.decode(prime)}{vocab.decode(row)}\n")
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted.", file=sys.stderr)
        return 130
    except LstmJaxError as err:
        print(f"error: {err.in_words_of(FLAGS)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
