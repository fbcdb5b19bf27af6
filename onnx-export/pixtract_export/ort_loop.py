"""A plain onnxruntime loop over the three graphs: the Python reference the Rust engine is compared with."""

from __future__ import annotations

import json
import os

import numpy as np


class OrtPixtral:
    def __init__(self, model_dir: str, providers=("CPUExecutionProvider",), threads: int = 0, spin: bool = True):
        import onnxruntime as ort

        with open(os.path.join(model_dir, "pixtract-model.json")) as f:
            self.manifest = json.load(f)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # onnxruntime's default is to spin; pixtract's benchmark passes its own setting so both sides match.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        g = self.manifest["graphs"]

        def session(name):
            return ort.InferenceSession(os.path.join(model_dir, g[name]["file"]), opts, providers=list(providers))

        self.vision = session("vision_encoder")
        self.embed = session("embed_tokens")
        self.decoder = session("decoder")
        t = self.manifest["text"]
        self.layers, self.kv_heads, self.head_dim = t["num_layers"], t["num_key_value_heads"], t["head_dim"]
        self.img_id = self.manifest["tokens"]["img"]
        self.eos = self.manifest["tokens"]["eos"]
        dtypes = {i.name: i.type for i in self.decoder.get_inputs()}
        self.float = np.float16 if dtypes["inputs_embeds"] == "tensor(float16)" else np.float32
        self.gqa = g["decoder"].get("attention", "eager") == "gqa"

    def image_features(self, image_chw: np.ndarray) -> np.ndarray:
        px = image_chw[None].astype(self.float)
        return self.vision.run(["image_features"], {"pixel_values": px})[0]

    def embeddings(self, ids: np.ndarray, images: list[np.ndarray]) -> np.ndarray:
        """ids [B,S]; images' features replace the [IMG] positions in order (row-major over the batch)."""
        embeds = self.embed.run(["inputs_embeds"], {"input_ids": ids.astype(np.int64)})[0]
        if images:
            feats = np.concatenate([self.image_features(i) for i in images], axis=0)
            pos = np.argwhere(ids == self.img_id)
            if len(pos) != feats.shape[0]:
                raise ValueError(f"{len(pos)} [IMG] tokens but {feats.shape[0]} image features")
            embeds[pos[:, 0], pos[:, 1]] = feats.astype(embeds.dtype)
        return embeds

    def empty_past(self, batch: int):
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.float) for _ in range(2 * self.layers)]

    def _run(self, feeds: dict, past):
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.decoder.run(None, feeds)
        return out[0][:, -1, :], out[1:]

    def prefill(self, rows: list[np.ndarray]):
        """Prompts' embeddings ([S_i, hidden] each) through the decoder as one batch, empty cache:
        (each row's last-position logits [B, vocab], decoding state).

        eager graphs take the batch left-padded with an attention mask; gqa graphs right-padded, each row's length
        in seqlens_k (the layout GroupQueryAttention expects). Either way row i's logits are its own prompt's.
        """
        n, width = len(rows), max(r.shape[0] for r in rows)
        lengths = np.array([r.shape[0] for r in rows], dtype=np.int64)
        embeds = np.zeros((n, width, rows[0].shape[1]), dtype=rows[0].dtype)
        if self.gqa:
            for i, r in enumerate(rows):
                embeds[i, : r.shape[0]] = r
            feeds = {"inputs_embeds": embeds, "position_ids": np.tile(np.arange(width, dtype=np.int64), (n, 1)),
                     "seqlens_k": (lengths - 1).astype(np.int32),
                     "total_sequence_length": np.array(width, dtype=np.int32), "logits_index": lengths - 1}
            logits, past = self._run(feeds, self.empty_past(n))
            return logits, {"past": past, "lengths": lengths}
        mask = np.zeros((n, width), dtype=np.int64)
        for i, r in enumerate(rows):
            embeds[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        logits, past = self._run(feeds, self.empty_past(n))
        return logits, {"past": past, "mask": mask, "lengths": lengths}

    def decode(self, tokens, state):
        """Appends one token per row: (next logits [B, vocab], new state)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        n = ids.shape[0]
        embeds = self.embed.run(["inputs_embeds"], {"input_ids": ids})[0]
        lengths = state["lengths"]
        if self.gqa:
            feeds = {"inputs_embeds": embeds, "position_ids": lengths[:, None].copy(),
                     "seqlens_k": lengths.astype(np.int32),
                     "total_sequence_length": np.array(int(lengths.max()) + 1, dtype=np.int32),
                     "logits_index": np.zeros(n, dtype=np.int64)}
            logits, past = self._run(feeds, state["past"])
            return logits, {"past": past, "lengths": lengths + 1}
        mask = np.concatenate([state["mask"], np.ones((n, 1), dtype=np.int64)], axis=1)
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": lengths[:, None].copy()}
        logits, past = self._run(feeds, state["past"])
        return logits, {"past": past, "mask": mask, "lengths": lengths + 1}

    def _prefill(self, ids: list[int], images: list[np.ndarray]):
        """Batch-1 prefill: (last-position logits [vocab], decoding state)."""
        embeds = self.embeddings(np.array([ids], dtype=np.int64), images)
        logits, state = self.prefill([embeds[0]])
        return logits[0], state

    def _feed(self, tok: int, state):
        """Appends one token to a batch-1 sequence: (next logits [vocab], decoding state)."""
        logits, state = self.decode([tok], state)
        return logits[0], state

    def greedy(self, ids: list[int], images: list[np.ndarray], max_new: int, stop_on_eos: bool = True):
        """Batch-1 greedy decoding; returns (new token ids, first-step logits)."""
        logits, state = self._prefill(ids, images)
        first = logits.copy()
        out = []
        for _ in range(max_new):
            tok = int(np.argmax(logits))
            out.append(tok)
            if stop_on_eos and tok == self.eos:
                break
            logits, state = self._feed(tok, state)
        return out, first

    def forced(self, ids: list[int], images: list[np.ndarray], tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] when `tokens` are fed one by one after the prompt (teacher forcing):
        row i is the distribution the model gives for position i, whatever it would have chosen before."""
        logits, state = self._prefill(ids, images)
        rows = [logits.astype(np.float32)]
        for tok in tokens[:-1]:
            logits, state = self._feed(tok, state)
            rows.append(logits.astype(np.float32))
        return np.stack(rows)
