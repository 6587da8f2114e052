"""The BERT text tower and its tokenizer (the only module that imports transformers)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from visd.config import TextConfig
from visd.errors import WeightsNotFoundError

__all__ = ["TextTower", "load_tokenizer"]

logger = logging.getLogger(__name__)

class _NoTokenTypes(nn.Module):
    """Stands in for BERT's token-type embedding: the ViSD text path adds none."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=token_type_ids.device).expand(
            *token_type_ids.shape, self.hidden_size
        )


def _bert_config(config: TextConfig):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        pad_token_id=config.pad_token_id,
        type_vocab_size=1,
    )


class TextTower(nn.Module):
    """transformers ``BertModel`` (no pooler, no token-type embedding) and a linear projection.

    The embedding of a text is the projected hidden state of its ``[CLS]`` token.
    """

    def __init__(self, config: TextConfig, embed_dim: int) -> None:
        super().__init__()
        from transformers import BertModel

        bert_config = _bert_config(config)
        bert_config._attn_implementation = "eager"
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.bert.embeddings.token_type_embeddings = _NoTokenTypes(config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings ``(N, embed_dim)`` from ``(N, L)`` token ids and mask."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden[:, 0])


def load_tokenizer(folder: str | Path, config: TextConfig):
    """A WordPiece tokenizer from a folder holding ``vocab.txt`` (and optionally ``tokenizer_config.json``)."""
    from transformers import BertTokenizer

    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        raise WeightsNotFoundError(
            f"no tokenizer vocabulary in {folder}: expected {folder / 'vocab.txt'}. "
            "Pass the text-encoder folder that holds vocab.txt (e.g. BiomedVLP-CXR-BERT-specialized)."
        )
    tokenizer = BertTokenizer.from_pretrained(str(folder), do_lower_case=config.do_lower_case, local_files_only=True)
    if len(tokenizer) > config.vocab_size:
        logger.warning("tokenizer in %s has %d tokens, text tower only %d", folder, len(tokenizer), config.vocab_size)
    return tokenizer
