"""Chat templates rendered by kvc vs transformers' apply_chat_template on the same tokenizer."""
from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvc.errors import GenerationError
from kvc.runtime.chat_template import ChatTemplate

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 style: system prompt folded into the first user turn, roles must alternate.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
    {% set turns = messages[1:] %}
{% else %}
    {% set system = '' %}
    {% set turns = messages %}
{% endif %}
{% for message in turns %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' -}}
    {% else %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {% endif %}
{% endfor %}"""

# Exercises the environment's extras: tojson without HTML escaping, loop controls, namespace.
EXTRAS = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
{{ message | tojson }}
    {% if ns.count >= 2 %}{% break %}{% endif %}
{% endfor %}
turns={{ ns.count }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "Answer in French <b>briefly</b>."},
        {"role": "user", "content": "  What is 2+2? 🙂  "},
        {"role": "assistant", "content": "Quatre."},
        {"role": "user", "content": "Et 3+3 ? «merci»"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("template", [CHATML, LLAMA2, EXTRAS], ids=["chatml", "llama2", "extras"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(hf_tokenizer, template, messages, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>").render(messages, add_generation_prompt)
    assert ours == expected


def test_loads_what_transformers_saves(hf_tokenizer, tmp_path):
    hf_tokenizer.chat_template = LLAMA2
    hf_tokenizer.save_pretrained(tmp_path)
    messages = CONVERSATIONS[1]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_dir(tmp_path).render(messages) == expected
    assert "<s>[INST] <<SYS>>" in expected


def test_reads_template_and_added_token_objects_from_tokenizer_config():
    config = {
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}],
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},
        "eos_token": "</s>",
    }
    template = ChatTemplate.from_tokenizer_config(config)
    assert (template.source, template.bos_token, template.eos_token) == (CHATML, "<s>", "</s>")


@pytest.mark.parametrize("config", [{}, {"chat_template": None}, {"chat_template": ""}])
def test_missing_template_raises(config, tmp_path):
    with pytest.raises(GenerationError, match="no chat template"):
        ChatTemplate.from_tokenizer_config(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(GenerationError, match="no chat template"):
        ChatTemplate.from_dir(tmp_path)


def test_template_exception_becomes_generation_error():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(GenerationError, match="roles must alternate"):
        ChatTemplate(LLAMA2, "<s>", "</s>").render(messages)


def test_sandbox_refuses_python_internals():
    with pytest.raises(GenerationError, match="refused"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(CONVERSATIONS[0])
    with pytest.raises(GenerationError, match="refused"):
        ChatTemplate("{{ messages.append(1) }}").render(CONVERSATIONS[0])


def test_invalid_jinja_and_bad_messages_raise():
    with pytest.raises(GenerationError, match="not valid Jinja2"):
        ChatTemplate("{% for m in messages %}").render(CONVERSATIONS[0])
    with pytest.raises(GenerationError, match="message 0"):
        ChatTemplate(CHATML).render([{"content": "no role"}])
    with pytest.raises(GenerationError, match="message 1"):
        ChatTemplate(CHATML).render([{"role": "user", "content": "a"}, {"role": "user", "content": 3}])
