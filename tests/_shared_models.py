"""Small models that tests in several folders use."""

import torch
from torch import nn


class PackedLSTM(nn.Module):
    """An LSTM over padded sequences packed by their lengths (the all-zero tail of a row
    is padding): torch.func transforms cannot run it ("Cannot access data pointer of
    Tensor that doesn't have storage"), so per-sample code must fall back to autograd."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        lengths = (x.abs().sum(-1) > 0).sum(1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        return self.head(self.rnn(packed)[1][0][-1])


class AppliedThroughWeight(nn.Module):
    """A parent applying a child layer's weight itself (as nn.MultiheadAttention does with
    out_proj): the child's forward hook never fires."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.inner(x)), self.proj.weight,
                                    self.proj.bias)


class Layout(nn.Module):
    """One function in three layouts: batch-first, sequence-first (nn.Transformer's
    default) and a flattened (samples * positions, d) input to the middle layer."""

    def __init__(self, layout):
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.inner = nn.Linear(3, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):  # x: (N, T, 3)
        if self.layout == "seq_first":
            h = self.inner(x.transpose(0, 1)).transpose(0, 1)
        elif self.layout == "flat":
            h = self.inner(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
        else:
            h = self.inner(x)
        return self.head(torch.tanh(h).mean(1))
