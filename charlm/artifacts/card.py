"""The model card: README.md of an exported folder, in the Hugging Face convention.

    ---                       YAML metadata: library_name, pipeline_tag, tags, datasets, metrics,
    ...                       model-index (the validation results, when there are some)
    ---
    # title                   what the model is, in one paragraph
    ## Evaluation             the exact figures of `charlm eval perplexity` on the validation split
    ## Sample                 drawn by the export, with the command that draws it again
    ## Training               corpus, model, optimisation, how long
    ## How to use             charlm; Python with safetensors; ONNX runtimes
    ## Files

Every fact comes from the folder's config.json (and the export's own measurements), so the card
never says anything the folder does not hold. YAML strings are written as JSON strings, which
YAML reads alike.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import MISSING, dataclass, field, fields

from charlm.model.config import MIN_CELLS, ModelConfig

MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}


@dataclass
class CardFacts:
    config: dict  # config.json's content
    parameters: int
    evaluation: dict | None  # {"split", "perplexity", "nats_per_char", "bits_per_char", ...}:
    # `charlm.inference.evaluate.Perplexity`'s; a byte-level model's also "bits_per_byte"
    sample: str  # prefix + continuation
    prefix: str
    sample_length: int
    seed: int
    onnx: bool
    weights_bytes: int
    name: str = "this folder"  # how commands name the folder
    notes: list[str] = field(default_factory=list)


CELL_NAMES = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM", "mingru": "minGRU", "minlstm": "minLSTM"}


def _q(text: str) -> str:
    return json.dumps(str(text), ensure_ascii=False)


def _corpus(config: dict) -> tuple[str, str]:
    """(name, description) of the corpus the model was trained on."""
    corpus = (config.get("training") or {}).get("corpus") or {}
    name = str(corpus.get("name") or "unknown")
    try:
        from charlm.data.corpus import registry

        entry = registry().get(name)
    except Exception:  # the card is still written without the registry's words
        entry = None
    return name, (entry.description if entry else f"{name} ({corpus.get('source', 'local text')})")


def _header(facts: CardFacts) -> str:
    model = facts.config["model"]
    cell = model["cell"]
    name, description = _corpus(facts.config)
    tags = ["charlm", "character-level", "language-model", "recurrent-neural-network", cell,
            "pytorch", "safetensors"] + (["onnx"] if facts.onnx else [])
    lines = ["---", "library_name: charlm", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {_q(t)}" for t in tags]
    lines += ["datasets:", f"- {_q(name)}", "metrics:", "- perplexity", "- bpc"]
    ev = facts.evaluation
    if ev:
        lines += [
            "model-index:", f"- name: {_q(facts.name)}", "  results:", "  - task:",
            "      type: text-generation", f"      name: {_q('Character-level language modelling')}",
            "    dataset:", f"      name: {_q(description)}", f"      type: {_q(name)}",
            "      split: validation", "    metrics:",
            "    - type: perplexity", f"      value: {ev['perplexity']!r}",
            f"      name: {_q(f'Validation perplexity (per {_unit(ev)})')}",
            "    - type: bpc", f"      value: {ev['bits_per_char']!r}",
            f"      name: {_q('Validation bits per character')}",
        ]
        if _unit(ev) == "byte":
            lines += ["    - type: bits_per_byte", f"      value: {ev['bits_per_byte']!r}",
                      f"      name: {_q('Validation bits per byte')}"]
    return "\n".join(lines + ["---", ""])


def _unit(ev: dict) -> str:
    """What a token is: "char", or "byte" for a byte-level model."""
    return ev.get("unit") or "char"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _model_line(model: dict, parameters: int) -> str:
    cell = CELL_NAMES.get(model["cell"], model["cell"])
    inputs = (f"a {model['embed']}-dimensional embedding" if model["embed"] else "one-hot inputs")
    extra = ""
    if model["cell"] == "rnn":
        extra = f", {model['nonlinearity']} nonlinearity"
    elif model["cell"] == "gru":
        extra = (", reset gate after the recurrent product (as torch.nn.GRU)"
                 if model["gru_reset"] == "after" else
                 ", reset gate before the recurrent product (Cho et al., d2l)")
    elif model["cell"] in MIN_CELLS:
        model = {**MODEL_DEFAULTS, **model}  # absent keys: ModelConfig's defaults
        norm = {"layer": "LayerNorm", "rms": "RMSNorm"}.get(model["norm"], "no normalisation")
        extra = f", {'' if model['residual'] else 'no '}residual connections, {norm}"
        if model["ffn"]:
            extra += f", feed-forward blocks {model['ffn']}x wide"
    return (f"{model['layers']}-layer {cell}, {model['hidden']} hidden units{extra}, {inputs}, "
            f"dropout {model['dropout']}, {model['vocab_size']} output characters; "
            f"{parameters:,} parameters")


def _training_rows(config: dict, parameters: int) -> list[tuple[str, str]]:
    training = config.get("training") or {}
    tc = training.get("train_config") or {}
    corpus = training.get("corpus") or {}
    name, description = _corpus(config)
    splits = corpus.get("splits") or {}
    rows = [("corpus", description),
            ("preprocessing", f"`{config['preprocessing']}`"),
            ("bytes" if config["preprocessing"] == "bytes" else "characters",
             f"{corpus.get('num_tokens', 0):,} (train {splits.get('train', 0):,}, "
                           f"validation {splits.get('val', 0):,}, test {splits.get('test', 0):,})"),
            ("vocabulary", f"{len(config['vocab']['tokens'])} symbols, `<unk>` included"),
            ("model", _model_line(config["model"], parameters))]
    if tc:
        rows += [
            ("optimisation", f"{tc.get('optimizer')} lr {tc.get('lr')}, weight decay "
                             f"{tc.get('weight_decay')}, schedule {tc.get('schedule')}, clip "
                             f"{tc.get('clip')}"),
            ("batches", f"{tc.get('batch_size')} x {tc.get('num_steps')} characters, "
                        f"{tc.get('sampling')} sampling (truncated BPTT)"),
            ("seed", str(tc.get("seed"))),
        ]
    best = training.get("best_val_loss")
    rows += [
        ("steps", f"{training.get('step', 0):,} ({training.get('tokens_seen', 0):,} "
                  f"{'bytes' if config['preprocessing'] == 'bytes' else 'characters'} seen, "
                  f"{_plural(training.get('epoch', 0), 'full epoch')})"),
        ("training time", _duration(training.get("elapsed"))),
        ("best validation loss (trainer's estimate)",
         f"{best:.4f} nats/{'byte' if config['preprocessing'] == 'bytes' else 'char'}"
         if isinstance(best, (int, float)) else "not measured"),
        ("trained with", f"charlm {training.get('charlm_version', '?')}"),
    ]
    return rows


def _byte_table(ev: dict) -> str:
    """A byte-level model's figures: per byte (perplexity, bits), and per character (the same
    nats over the characters the bytes decode to)."""
    return ("| split | bytes | characters | perplexity (per byte) | bits / byte | bits / char |\n"
            "|---|---|---|---|---|---|\n"
            f"| validation | {ev['bytes']:,} | {ev['characters']:,} | {ev['perplexity']:.4f} | "
            f"{ev['bits_per_byte']:.4f} | {ev['bits_per_char']:.4f} |\n")


def model_card(facts: CardFacts) -> str:
    config, ev, name = facts.config, facts.evaluation, facts.name
    model = config["model"]
    cell = CELL_NAMES.get(model["cell"], model["cell"])
    corpus_name, description = _corpus(config)
    parts = [_header(facts)]
    parts.append(
        f"# {name}: a character-level {cell} language model\n\n"
        f"A {_model_line(model, facts.parameters)}. Trained with charlm on {description}; it "
        "predicts the next character from all the text before it, so it continues any prompt "
        "one character at a time.\n")
    parts.append("## Evaluation\n")
    if ev:
        parts.append(
            "Exact figures on the held-out validation split: one stream over every character, "
            "each predicted from all of the text before it (the hidden state carried), as "
            f"`charlm eval perplexity --checkpoint {shlex.quote(name)}` prints them.\n\n"
            + (_byte_table(ev) if _unit(ev) == "byte" else
               "| split | characters | perplexity | bits / char | nats / char | `<unk>` share |\n"
               "|---|---|---|---|---|---|\n"
               f"| validation | {ev['characters']:,} | {ev['perplexity']:.4f} | "
               f"{ev['bits_per_char']:.4f} | {ev['nats_per_char']:.4f} | {ev['unk_share']:.4%} |\n"))
    else:
        parts.append("Not measured when this folder was made"
                     + "".join(f": {n}" for n in facts.notes[:1]) + ". Measure it on a text with "
                     f"`charlm eval perplexity --checkpoint {shlex.quote(name)} --text FILE`.\n")
    command = (f"charlm generate --checkpoint {shlex.quote(name)} --prefix {shlex.quote(facts.prefix)} "
               f"--length {facts.sample_length} --seed {facts.seed} --device cpu"
               if facts.prefix else
               f"charlm generate --checkpoint {shlex.quote(name)} --length {facts.sample_length} --seed "
               f"{facts.seed} --device cpu")
    fence = "````" if "```" in facts.sample else "```"
    parts.append(
        "## Sample\n\n"
        f"{facts.sample_length} characters drawn at temperature 1 (no filtering) after the "
        f"prompt {json.dumps(facts.prefix) if facts.prefix else '(none: from a zero state)'}:\n\n"
        f"{fence}text\n{facts.sample}\n{fence}\n\n"
        f"The same command draws the same text:\n\n```bash\n{command}\n```\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in _training_rows(config, facts.parameters))
    parts.append(f"## Training\n\n| | |\n|---|---|\n{rows}\n")
    usage = (
        "## How to use\n\n"
        f"With charlm installed, this folder goes wherever a checkpoint does:\n\n```bash\n"
        f"charlm generate --checkpoint {shlex.quote(name)} --prefix \"...\" --length 500 --temperature 0.8\n"
        f"charlm generate --checkpoint {shlex.quote(name)} --prefix \"...\" --beam 5   # beam search\n"
        f"charlm eval perplexity --checkpoint {shlex.quote(name)} --text FILE\n```\n\n"
        "Without charlm: `config.json` holds the model's sizes (`model`), the vocabulary "
        "(`vocab.tokens`, index 0 is `<unk>`) and the preprocessing to apply to a prompt "
        f"(`{config['preprocessing']}`); `model.safetensors` holds the weights, named and laid "
        f"out as `torch.nn.{cell}(batch_first=True)`'s under `rnn.`, then `embedding.weight` "
        "(absent for one-hot inputs) and `head.weight`, `head.bias` (the output layer).\n\n"
        "```python\nimport json\nfrom safetensors.torch import load_file\n\n"
        f"config = json.load(open(\"{name}/config.json\"))\n"
        f"weights = load_file(\"{name}/model.safetensors\")\n```\n")
    if facts.onnx:
        onnx = config.get("onnx") or {}
        usage += (
            "\n`model.onnx` is one step of the model, for any ONNX runtime: inputs "
            f"{', '.join(f'`{n}`' for n in onnx.get('inputs', []))} (the character just read, "
            "int64 `(batch,)`; the state, float32 `(layers, batch, hidden)`, zeros to start), "
            f"outputs {', '.join(f'`{n}`' for n in onnx.get('outputs', []))} (the next "
            "character's logits `(batch, vocab)`; the state to feed back). charlm's "
            "`scripts/onnx_generate.py` samples text with onnxruntime and the standard library "
            f"alone:\n\n```bash\npython scripts/onnx_generate.py {shlex.quote(name)} --prefix \"...\" "
            "--length 300\n```\n")
    parts.append(usage)
    files = [("config.json", "the model's sizes, vocabulary, preprocessing, training and "
                             "evaluation facts"),
             ("model.safetensors", f"the weights ({facts.weights_bytes:,} bytes, float32)")]
    if facts.onnx:
        files.append(("model.onnx", "the one-character step as an ONNX graph"))
    files.append(("README.md", "this card"))
    parts.append("## Files\n\n" + "\n".join(f"- `{f}`: {what}" for f, what in files) + "\n")
    return "\n".join(parts)
