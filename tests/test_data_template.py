import torch

from rlhfkit.data import encode_prompt, encode_response, pad, position_ids, truncate

CONV = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_template_token_boundary(tokenizer):
    """prompt_ids + response_ids is exactly the template's rendering of the whole conversation (up to
    and including EOS), the prompt ends with the generation prompt, and the response ends in EOS."""
    prompt = encode_prompt(tokenizer, CONV)
    response = encode_response(tokenizer, "Paris.")
    full = tokenizer.apply_chat_template(CONV + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert tokenizer.decode(prompt + response) == full[: -len("\n")]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert response[-1] == tokenizer.eos_token_id and tokenizer.decode(response[:-1]) == "Paris."
    # the boundary is the same for chosen and rejected: both start right after the same prompt ids
    assert encode_prompt(tokenizer, CONV) == prompt


def test_multi_turn_response_boundary(tokenizer):
    rest = [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid."}]
    prompt, response = encode_prompt(tokenizer, CONV), encode_response(tokenizer, rest, CONV)
    full = tokenizer.apply_chat_template(CONV + rest, tokenize=False)
    assert tokenizer.decode(prompt + response) == full.rstrip("\n")
    assert response[-1] == tokenizer.eos_token_id


def test_pad_token_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_truncation_policies():
    p, r = [1, 2, 3, 4], [7, 8, 9]
    assert truncate(p, r, 10, "drop").input_ids == p + r
    assert truncate(p, r, 5, "prompt_left").input_ids == [3, 4, 7, 8, 9]
    assert truncate(p, r, 5, "prompt_left").prompt_len == 2
    assert truncate(p, r, 5, "right").input_ids == [1, 2, 3, 4, 7]
    assert truncate(p, r, 5, "drop") is None
    assert truncate(p, r, 3, "prompt_left") is None  # the response alone does not fit beside the prompt
    assert truncate(p, r, 4, "right") is None


def test_padding_sides_and_positions():
    right, left = pad([[5, 6], [7]], 0, "right"), pad([[5, 6], [7]], 0, "left")
    assert right.tolist() == [[5, 6], [7, 0]] and left.tolist() == [[5, 6], [0, 7]]
    assert position_ids(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]
