"""The Evoformer (AF2 Algorithm 6) and its updates; the extra MSA stack is the same block with global
column attention (Algorithm 18).

msa [B, S, N, c_m] with msa_mask [B, S, N]; pair [B, N, N, c_z] with pair_mask [B, N, N].
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.models.helixfold.primitives import GatedAttention, GlobalAttention, Linear, Transition, shared_dropout


class MSARowAttentionWithPairBias(nn.Layer):
    """Algorithm 7: each MSA row attends along the residues, biased per head by a projection of the pair."""

    def __init__(self, c_m, c_z, num_heads, head_dim, fuse, chunk_size):
        super().__init__()
        self.msa_norm = nn.LayerNorm(c_m)
        self.pair_norm = nn.LayerNorm(c_z)
        self.pair_bias = Linear(c_z, num_heads, bias=False)
        self.attention = GatedAttention(c_m, c_m, num_heads, head_dim, c_m, fuse=fuse, chunk_size=chunk_size)

    def forward(self, msa, msa_mask, pair, dap=None):
        bias = self.pair_bias(self.pair_norm(pair)).transpose([0, 3, 1, 2])  # [B, H, N, N]
        if dap is not None:  # axial parallelism: this rank's pair rows -> the whole bias
            bias = dap.gather(bias, 2)
        x = self.msa_norm(msa)
        return self.attention(x, x, msa_mask, bias)


class MSAColumnAttention(nn.Layer):
    """Algorithm 8: each residue's column attends along the sequences."""

    def __init__(self, c_m, num_heads, head_dim, fuse, chunk_size):
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.attention = GatedAttention(c_m, c_m, num_heads, head_dim, c_m, fuse=fuse, chunk_size=chunk_size)

    def forward(self, msa, msa_mask):
        x = self.norm(msa.transpose([0, 2, 1, 3]))
        return self.attention(x, x, msa_mask.transpose([0, 2, 1])).transpose([0, 2, 1, 3])


class MSAColumnGlobalAttention(nn.Layer):
    """Algorithm 19: the extra MSA's column attention with one (mean) query per column."""

    def __init__(self, c_m, num_heads, head_dim, chunk_size):
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.attention = GlobalAttention(c_m, num_heads, head_dim, chunk_size=chunk_size)

    def forward(self, msa, msa_mask):
        x = self.norm(msa.transpose([0, 2, 1, 3]))
        return self.attention(x, msa_mask.transpose([0, 2, 1])).transpose([0, 2, 1, 3])


class OuterProductMean(nn.Layer):
    """Algorithm 10: the mean over sequences of the outer product of two projections of the MSA, per residue
    pair; computed for chunk_size residues i at a time when set."""

    def __init__(self, c_m, c_z, channel, chunk_size):
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.left = Linear(c_m, channel)
        self.right = Linear(c_m, channel)
        self.output = Linear(channel * channel, c_z, init="final")
        self.channel, self.chunk_size = channel, chunk_size

    def forward(self, msa, msa_mask, dap=None):
        x = self.norm(msa)
        mask = msa_mask.astype(x.dtype).unsqueeze(-1)
        left, right = self.left(x) * mask, self.right(x) * mask  # [B, S, N, c]
        mask_j = msa_mask.astype(x.dtype)
        if dap is not None:  # axial parallelism: msa holds this rank's residues i; j runs over all of them
            right, mask_j = dap.gather(right, 2), dap.gather(mask_j, 2)
        # norm[i, j]: the number of sequences where both residues are present
        norm = paddle.matmul(msa_mask.astype(x.dtype), mask_j, transpose_x=True).unsqueeze(-1)
        n, c = right.shape[2], self.channel
        right_flat = right.reshape([0, 0, n * c])  # [B, S, N*c]
        step = self.chunk_size or left.shape[2]
        pieces = []
        for start in range(0, left.shape[2], step):
            chunk = left[:, :, start:start + step]  # [B, S, n_i, c]
            n_i = chunk.shape[2]
            outer = paddle.matmul(chunk.reshape([0, 0, n_i * c]), right_flat, transpose_x=True)  # [B, n_i*c, N*c]
            outer = outer.reshape([0, n_i, c, n, c]).transpose([0, 1, 3, 2, 4]).reshape([0, n_i, n, c * c])
            pieces.append(self.output(outer))
        out = pieces[0] if len(pieces) == 1 else paddle.concat(pieces, axis=1)
        return out / (norm + 1e-3)


class TriangleMultiplication(nn.Layer):
    """Algorithms 11 (outgoing: edge ij from ik and jk) and 12 (incoming: from ki and kj)."""

    def __init__(self, c_z, channel, outgoing):
        super().__init__()
        self.outgoing = outgoing
        self.norm = nn.LayerNorm(c_z)
        self.left_proj, self.right_proj = Linear(c_z, channel), Linear(c_z, channel)
        self.left_gate, self.right_gate = Linear(c_z, channel, init="gating"), Linear(c_z, channel, init="gating")
        self.output_norm = nn.LayerNorm(channel)
        self.output = Linear(channel, c_z, init="final")
        self.output_gate = Linear(c_z, c_z, init="gating")

    def forward(self, pair, pair_mask, dap=None):
        z = self.norm(pair)
        mask = pair_mask.astype(z.dtype).unsqueeze(-1)
        left = mask * F.sigmoid(self.left_gate(z)) * self.left_proj(z)  # [B, N, N, c]
        right = mask * F.sigmoid(self.right_gate(z)) * self.right_proj(z)
        if dap is not None:  # axial parallelism: pair holds this rank's rows i
            right = dap.gather(right, 1)  # every row j (outgoing) or k (incoming)
            if not self.outgoing:
                left = dap.transpose(left, 1, 2)  # left[k, i]: every k, this rank's columns i
        if self.outgoing:  # x[i, j] = sum_k left[i, k] right[j, k]
            x = paddle.matmul(left.transpose([0, 3, 1, 2]), right.transpose([0, 3, 2, 1]))
        else:  # x[i, j] = sum_k left[k, i] right[k, j]
            x = paddle.matmul(left.transpose([0, 3, 2, 1]), right.transpose([0, 3, 1, 2]))
        x = self.output(self.output_norm(x.transpose([0, 2, 3, 1])))
        return F.sigmoid(self.output_gate(z)) * x


class TriangleAttention(nn.Layer):
    """Algorithms 13 (around the starting node: row i attends along its edges ik, biased by edge jk) and 14
    (around the ending node: the same on the transposed pair)."""

    def __init__(self, c_z, num_heads, head_dim, starting, fuse, chunk_size):
        super().__init__()
        self.starting = starting
        self.norm = nn.LayerNorm(c_z)
        self.bias = Linear(c_z, num_heads, bias=False)
        self.attention = GatedAttention(c_z, c_z, num_heads, head_dim, c_z, fuse=fuse, chunk_size=chunk_size)

    def forward(self, pair, pair_mask, dap=None):
        if not self.starting:
            pair, pair_mask = pair.transpose([0, 2, 1, 3]), pair_mask.transpose([0, 2, 1])
        z = self.norm(pair)
        bias = self.bias(z).transpose([0, 3, 1, 2])  # [B, H, N, N]
        if dap is not None:  # axial parallelism: this rank's rows (columns when ending) -> the whole bias
            bias = dap.gather(bias, 2)
        out = self.attention(z, z, pair_mask, bias)
        return out if self.starting else out.transpose([0, 2, 1, 3])


class EvoformerBlock(nn.Layer):
    """One block of the Evoformer (or, with global_column, of the extra MSA stack)."""

    def __init__(self, c_m, c_z, row_heads, row_head_dim, column_heads, column_head_dim, cfg, global_column=False):
        super().__init__()
        fuse, chunk = cfg.fuse_gate_attention, cfg.chunk_size
        self.msa_dropout, self.pair_dropout = cfg.msa_dropout, cfg.pair_dropout
        self.row_attention = MSARowAttentionWithPairBias(c_m, c_z, row_heads, row_head_dim, fuse, chunk)
        if global_column:
            self.column_attention = MSAColumnGlobalAttention(c_m, column_heads, column_head_dim, chunk)
        else:
            self.column_attention = MSAColumnAttention(c_m, column_heads, column_head_dim, fuse, chunk)
        self.msa_transition = Transition(c_m, cfg.transition_factor, chunk)
        self.outer_product_mean = OuterProductMean(c_m, c_z, cfg.outer_product_channel, chunk)
        self.tri_mul_out = TriangleMultiplication(c_z, cfg.triangle_mult_channel, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_z, cfg.triangle_mult_channel, outgoing=False)
        self.tri_att_start = TriangleAttention(c_z, cfg.triangle_heads, cfg.triangle_head_dim, True, fuse, chunk)
        self.tri_att_end = TriangleAttention(c_z, cfg.triangle_heads, cfg.triangle_head_dim, False, fuse, chunk)
        self.pair_transition = Transition(c_z, cfg.transition_factor, chunk)

    def forward(self, msa, pair, msa_mask, pair_mask, dap=None):
        if dap is not None and dap.enabled:
            return self.forward_axial(msa, pair, msa_mask, pair_mask, dap)
        training = self.training
        msa = msa + shared_dropout(self.row_attention(msa, msa_mask, pair), self.msa_dropout, 1, training)
        msa = msa + self.column_attention(msa, msa_mask)
        msa = msa + self.msa_transition(msa)
        pair = pair + self.outer_product_mean(msa, msa_mask)
        pair = pair + shared_dropout(self.tri_mul_out(pair, pair_mask), self.pair_dropout, 1, training)
        pair = pair + shared_dropout(self.tri_mul_in(pair, pair_mask), self.pair_dropout, 1, training)
        pair = pair + shared_dropout(self.tri_att_start(pair, pair_mask), self.pair_dropout, 1, training)
        pair = pair + shared_dropout(self.tri_att_end(pair, pair_mask), self.pair_dropout, 2, training)
        pair = pair + self.pair_transition(pair)
        return msa, pair

    def forward_axial(self, msa, pair, msa_mask, pair_mask, dap):
        """The block under dynamic axial parallelism (ppzoo.distributed.axial_parallel): msa holds this rank's
        sequences [B, S/D, N, C] and pair its rows [B, N/D, N, C], on entry and on return; the masks are
        whole. The column-wise operations and the ending-node attention run between all-to-all transposes."""
        training = self.training
        rows_mask, columns_mask = dap.shard_of(msa_mask, 1), dap.shard_of(msa_mask, 2)
        pair_rows_mask, pair_columns_mask = dap.shard_of(pair_mask, 1), dap.shard_of(pair_mask, 2)
        update = self.row_attention(msa, rows_mask, pair, dap)
        msa = msa + shared_dropout(update, self.msa_dropout, 1, training)
        msa = dap.transpose(msa, 1, 2)  # sequences split -> residues split
        msa = msa + self.column_attention(msa, columns_mask)
        msa = msa + self.msa_transition(msa)
        pair = pair + self.outer_product_mean(msa, columns_mask, dap)
        msa = dap.transpose(msa, 2, 1)
        pair = pair + shared_dropout(self.tri_mul_out(pair, pair_rows_mask, dap), self.pair_dropout, 1, training)
        pair = pair + shared_dropout(self.tri_mul_in(pair, pair_rows_mask, dap), self.pair_dropout, 1, training)
        pair = pair + shared_dropout(self.tri_att_start(pair, pair_rows_mask, dap), self.pair_dropout, 1, training)
        columns = dap.transpose(pair, 1, 2)  # rows split -> columns split
        update = self.tri_att_end(columns, pair_columns_mask, dap)
        pair = pair + shared_dropout(dap.transpose(update, 2, 1), self.pair_dropout, 2, training)
        pair = pair + self.pair_transition(pair)
        return msa, pair


class EvoformerStack(nn.Layer):
    """evoformer_blocks blocks, then the single representation from the MSA's first row (Algorithm 6)."""

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.LayerList([
            EvoformerBlock(cfg.msa_channel, cfg.pair_channel, cfg.msa_row_heads, cfg.msa_row_head_dim,
                           cfg.msa_column_heads, cfg.msa_column_head_dim, cfg)
            for _ in range(cfg.evoformer_blocks)
        ])
        self.single = Linear(cfg.msa_channel, cfg.single_channel)
        self.axial = None  # an AxialParallel group (ppzoo.distributed.axial_parallel) to split the blocks over

    def forward(self, msa, pair, msa_mask, pair_mask):
        dap = self.axial if self.axial is not None and self.axial.enabled else None
        if dap is not None:  # every rank holds its share of the sequences and of the pair's rows
            msa, pair = dap.split(msa, 1), dap.split(pair, 1)
        for block in self.blocks:
            msa, pair = block(msa, pair, msa_mask, pair_mask, dap)
        if dap is not None:
            msa, pair = dap.collect(msa, 1), dap.collect(pair, 1)
        return msa, pair, self.single(msa[:, 0])


class ExtraMSAStack(nn.Layer):
    """Algorithm 18: the extra (unclustered) sequences, embedded at width c_e, update the pair."""

    def __init__(self, cfg):
        super().__init__()
        self.embed = Linear(cfg.extra_msa_classes + 2, cfg.extra_msa_channel)
        self.blocks = nn.LayerList([
            EvoformerBlock(cfg.extra_msa_channel, cfg.pair_channel, cfg.extra_msa_row_heads,
                           cfg.extra_msa_row_head_dim, cfg.extra_msa_column_heads, cfg.extra_msa_column_head_dim,
                           cfg, global_column=True)
            for _ in range(cfg.extra_msa_blocks)
        ])
        self.axial = None  # as EvoformerStack.axial

    def forward(self, extra_msa_feat, extra_msa_mask, pair, pair_mask):
        dap = self.axial if self.axial is not None and self.axial.enabled else None
        if dap is not None:
            extra_msa_feat, pair = dap.split(extra_msa_feat, 1), dap.split(pair, 1)
        extra = self.embed(extra_msa_feat)
        for block in self.blocks:
            extra, pair = block(extra, pair, extra_msa_mask, pair_mask, dap)
        return pair if dap is None else dap.collect(pair, 1)
