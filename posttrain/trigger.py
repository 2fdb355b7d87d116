"""The memory trigger: at each delimiter, insert latents or not.

Fixed policies for ablations ("always", "never", "every:k" = every k-th delimiter) and a learned one:
a small MLP on the reasoner's last hidden state at the delimiter, 2-way softmax (class 1 = insert),
trained with REINFORCE/GRPO on task reward minus a cost per insertion (MemGen's invocation penalty).
"""

import torch
from torch import nn


class FixedTrigger:
    def __init__(self, policy: str):
        if policy in ("always", "never"):
            self.every = 1 if policy == "always" else 0
        elif policy.startswith("every:") and policy[6:].isdigit() and int(policy[6:]) > 0:
            self.every = int(policy[6:])
        else:
            raise ValueError(f"trigger policy {policy!r} is unknown; use always, never, every:K or learned")

    def decide(self, hidden, inserted: int, delimiter_index: int):
        """(insert?, log-prob of the decision or None): every k-th delimiter (1st, k+1-th, ...)."""
        return (self.every > 0 and delimiter_index % self.every == 0), None


class LearnedTrigger(nn.Module):
    def __init__(self, hidden_size: int, width: int = 256, sample: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 2))
        self.sample = sample

    def decide(self, hidden, inserted: int, delimiter_index: int):
        log_probs = torch.log_softmax(self.net(hidden.float()), -1)
        action = int(torch.multinomial(log_probs.exp(), 1)) if self.sample else int(log_probs.argmax())
        return bool(action), log_probs[action]


def build_trigger(policy: str, hidden_size: int):
    return LearnedTrigger(hidden_size) if policy == "learned" else FixedTrigger(policy)
