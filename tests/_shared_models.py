"""Small models that tests in several folders use."""

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
