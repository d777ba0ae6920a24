"""Chat templates: a conversation -> token ids and which of them belong to assistant turns.

Rendering follows transformers' ``apply_chat_template`` (Jinja in a sandboxed environment with
``trim_blocks``/``lstrip_blocks``, loop controls, the ``{% generation %}`` tag, ``tojson``,
``raise_exception``, ``strftime_now``; the tokenizer's special tokens as variables), and the
rendered text is tokenized whole, without added BOS/EOS, as transformers does with
``tokenize=True`` - so the ids here are the ids a transformers user of the exported tokenizer
gets.

Which template: ``--chat-template FILE`` when given, else the tokenizer's own
(``chat_template`` in tokenizer_config.json, or chat_template.jinja beside it), else
:data:`DEFAULT_CHAT_TEMPLATE`.

Assistant spans are found the way Tulu 3's SFT recipe (the one the Trillion report follows)
finds them, for any template: for assistant message ``i`` the span starts where the rendering
of ``messages[:i]`` with the generation prompt ends and stops where the rendering of
``messages[:i + 1]`` ends, minus trailing whitespace (separators after the end-of-turn token
are formatting between turns, never generated). The span is the content plus the template's
end-of-turn token(s). A token is an assistant token when its characters overlap a span
(transformers' rule for ``return_assistant_tokens_mask``). A template whose partial renderings
are not prefixes of the whole (e.g. one that rewrites earlier turns) is refused: its loss mask
would not correspond to what the model sees.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional, Sequence

from megatron_trillion.errors import UserError

ROLES = ("system", "user", "assistant")

# Plain-text role markers (Tulu 3's format) and the tokenizer's own EOS as the end of an
# assistant turn. Why plain text rather than new special tokens: it works with every
# tokenizer unchanged - no vocabulary growth, no new (untrained) embedding rows, a pretrained
# checkpoint loads as-is at any TP - and the end-of-turn is the EOS the model already learned
# to end documents with in pretraining, which generation_config.json already stops at.
# Tokenizers trained by this project ship their own ChatML template with reserved
# <|im_start|>/<|im_end|> special tokens, which is used instead. The generation tags let
# transformers' return_assistant_tokens_mask see the same spans.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatTemplateError(UserError):
    """The template cannot render a conversation (its own error, or not incremental)."""


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # ``{% generation %}...{% endgeneration %}`` marks assistant text for transformers'
        # assistant masks; rendering only needs its body (spans are found incrementally).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def tokenizer_chat_template(tokenizer_model: Optional[str]) -> Optional[str]:
    """The chat template shipped with a HF tokenizer (directory or tokenizer.json), or None."""
    if not tokenizer_model:
        return None
    directory = tokenizer_model if os.path.isdir(tokenizer_model) else \
        os.path.dirname(tokenizer_model)
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    return None


def resolve_chat_template(chat_template_file: Optional[str],
                          tokenizer_model: Optional[str]) -> tuple[str, str]:
    """(template text, where it came from): ``--chat-template`` > the tokenizer's > default."""
    if chat_template_file:
        if not os.path.isfile(chat_template_file):
            raise UserError(f"--chat-template {chat_template_file}: no such file")
        with open(chat_template_file, encoding="utf-8") as f:
            text = f.read()
        if chat_template_file.endswith(".json"):  # a tokenizer_config.json-style file
            text = json.loads(text).get("chat_template", "")
        if not text.strip():
            raise UserError(f"--chat-template {chat_template_file}: the template is empty")
        return text, f"--chat-template {chat_template_file}"
    own = tokenizer_chat_template(tokenizer_model)
    if own is not None:
        return own, f"the tokenizer's chat_template ({tokenizer_model})"
    return DEFAULT_CHAT_TEMPLATE, "the default template (plain-text role markers, EOS ends a turn)"


def special_token_strings(tokenizer) -> dict:
    """The template variables transformers passes from the tokenizer's special tokens."""
    backend = tokenizer.backend
    out = {}
    for name, token_id in (("eos_token", tokenizer.eod), ("bos_token", tokenizer.bos),
                           ("pad_token", tokenizer.pad)):
        if token_id is not None:
            out[name] = backend.id_to_token(token_id)
    return out


class ChatFormat:
    """A compiled template bound to a tokenizer (a ``tokenizers``-backed wrapper from
    ``megatron_trillion.data.tokenizers``: HuggingFaceTokenizer or GPT2BPETokenizer)."""

    def __init__(self, template: str, tokenizer) -> None:
        if not hasattr(tokenizer, "backend"):
            raise UserError(
                f"SFT needs a tokenizer with character offsets (HuggingFaceTokenizer or "
                f"GPT2BPETokenizer), not {type(tokenizer).__name__}; convert the SentencePiece "
                "model to a tokenizer.json")
        import jinja2

        self.template = template
        self.tokenizer = tokenizer
        self.variables = special_token_strings(tokenizer)
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc} "
                                    f"(template line {exc.lineno})") from exc

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from exc

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, [(start, end) character spans of assistant turns])."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not through.startswith(before) or not full.startswith(through):
                raise ChatTemplateError(
                    f"the chat template does not render conversations incrementally (message "
                    f"{i + 1}: the rendering of the earlier messages is not a prefix of the "
                    "whole), so assistant turns cannot be located; use --chat-template with a "
                    "template that appends each turn")
            start = len(before)
            end = start + len(through[start:].rstrip())
            if end == start:
                raise ChatTemplateError(f"assistant message {i + 1} renders to no text")
            spans.append((start, end))
        return full, spans

    def encode(self, messages: Sequence[dict], final_only: bool = False
               ) -> tuple[list[int], list[int]]:
        """(token ids, assistant flags per token) of a whole conversation; ``final_only``:
        only the last assistant turn is flagged (a preference pair's response)."""
        text, spans = self.assistant_spans(messages)
        if final_only:
            spans = spans[-1:]
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        flags = []
        span = 0
        for start, end in encoding.offsets:
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            flags.append(int(span < len(spans) and end > spans[span][0]))
        return list(encoding.ids), flags

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation followed by the generation prompt (for chatting)."""
        text = self.render(messages, add_generation_prompt=True)
        return list(self.tokenizer.backend.encode(text, add_special_tokens=False).ids)

    def end_of_turn_ids(self) -> list[int]:
        """Special tokens that close an assistant turn (after its content): where generation
        stops. The tokenizer's EOS is always among them."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
        ids, flags = self.encode(probe)
        backend = self.tokenizer.backend
        special = {backend.token_to_id(t.content) for t in _added_tokens(backend)
                   if t.special}
        found = [self.tokenizer.eod]
        for token_id, flag in zip(ids, flags):
            if flag and token_id in special and token_id not in found:
                found.append(token_id)
        return found


def _added_tokens(backend) -> list:
    return list(backend.get_added_tokens_decoder().values())


def write_chat_template(directory: str, template: str, tokenizer) -> None:
    """Put ``template`` into ``directory``/tokenizer_config.json (created when the tokenizer
    came without one, naming its special tokens), so transformers' ``apply_chat_template``
    renders exactly what training rendered. Replaces a chat_template.jinja, which would take
    precedence in transformers."""
    path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for name, content in special_token_strings(tokenizer).items():
        config.setdefault(name, content)
    config["chat_template"] = template
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        os.remove(jinja_path)
