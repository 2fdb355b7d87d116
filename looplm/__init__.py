"""looplm: Ouro-style looped language models (the model library; no DeepSpeed here)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .attention import left_pad, position_ids_from_mask
from .cache import LoopCache
from .config import LoopLMConfig, preset_config
from .decode import generate_asynchronous, generate_continuous
from .exits import ExitPolicy, exit_distribution, exit_entropy
from .model import LoopLMForCausalLM, LoopLMModel, LoopLMOutput, compile_layers
from .objectives import stage1_loss, stage2_gate_loss, token_cross_entropy

AutoConfig.register("ouro", LoopLMConfig, exist_ok=True)
AutoModel.register(LoopLMConfig, LoopLMModel, exist_ok=True)
AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM, exist_ok=True)

__all__ = [
    "ExitPolicy", "LoopCache", "compile_layers", "LoopLMConfig", "LoopLMForCausalLM", "LoopLMModel", "LoopLMOutput",
    "exit_distribution", "exit_entropy", "generate_asynchronous", "generate_continuous", "left_pad", "position_ids_from_mask", "preset_config", "stage1_loss", "stage2_gate_loss",
    "token_cross_entropy",
]
