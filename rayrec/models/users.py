"""User axis: whether (and how) the user's identity enters the sequence model.

A user part gives the item-embedding width, may perturb ids in training, widens each position's
input to the model width, and returns the per-position score offset its share of the hidden state
contributes (SSE-PT scores ``h . [e_item; e_user]``).
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.models.seqrec import emb_init_std


class NoUser(nn.Module):
    def __init__(self, cfg, d: int, num_items: int, num_users: int):
        super().__init__()
        self.item_dim = d

    def perturb(self, items: torch.Tensor, users: torch.Tensor | None):
        return items, users

    def embed(self, x: torch.Tensor, users: torch.Tensor | None) -> torch.Tensor:
        return x

    def split(self, h: torch.Tensor, users: torch.Tensor | None):
        return h, None  # (item part of h, score offset)


class SSEPT(nn.Module):
    """SSE-PT (Wu et al., RecSys 2020): a user embedding concatenated to every position's item
    embedding (and to every candidate's), regularised by Stochastic Shared Embeddings: in training
    each user id (and each input item id) is replaced by a uniformly random one with probability p.
    """

    def __init__(self, cfg, d: int, num_items: int, num_users: int):
        super().__init__()
        if num_users < 1:
            raise ValueError("model.user=ssept needs the number of users; pass num_users to build_model")
        self.user_dim = cfg.user_dim
        self.item_dim = d - cfg.user_dim
        self.num_items, self.num_users = num_items, num_users
        self.p_user, self.p_item = cfg.sse_user_prob, cfg.sse_item_prob
        self.user_emb = nn.Embedding(num_users + 1, cfg.user_dim)  # user_idx is 1..U
        # the item table's convention at the user width, so both halves of each input start at one
        # scale: a unit-variance user half beside 0.02-std items drowned them (ML-1M-ts, 120 epochs,
        # same settings: full NDCG@10 0.071 with it, 0.093 without)
        nn.init.normal_(self.user_emb.weight, std=emb_init_std(cfg, max(1, cfg.user_dim))[0])

    def perturb(self, items: torch.Tensor, users: torch.Tensor | None):
        if not self.training:
            return items, users
        if self.p_item > 0:
            swap = (torch.rand(items.shape, device=items.device) < self.p_item) & (items != 0)
            items = torch.where(swap, torch.randint_like(items, 1, self.num_items + 1), items)
        if self.p_user > 0:
            swap = torch.rand(users.shape, device=users.device) < self.p_user
            users = torch.where(swap, torch.randint_like(users, 1, self.num_users + 1), users)
        return items, users

    def embed(self, x: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        u = self.user_emb(users)[:, None, :].expand(-1, x.shape[1], -1)  # (B, T, Du)
        return torch.cat([x, u * self.user_dim ** 0.5], dim=-1)  # (B, T, D); scaled like the items

    def split(self, h: torch.Tensor, users: torch.Tensor):
        h_item, h_user = h[..., : self.item_dim], h[..., self.item_dim:]
        offset = (h_user * self.user_emb(users)[:, None, :]).sum(-1)  # (B, T)
        return h_item, offset


USERS = {"none": NoUser, "ssept": SSEPT}
