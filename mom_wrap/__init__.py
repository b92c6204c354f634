"""mom_wrap: turn a linear-attention or state-space layer into a Mixture-of-Memories layer."""
from mom_wrap.interpret import interpret_on_cpu  # first: it must run before Triton is imported, and imports nothing
from mom_wrap import hf, stats  # noqa: F401  (hf: converted models' classes, registered with transformers)
from mom_wrap.adapters import supported_hosts
from mom_wrap.balance import load_balancing_loss, set_balance_loss_scale, set_balance_loss_weight
from mom_wrap.convert import convert
from mom_wrap.fla_mom import import_fla_mom
from mom_wrap.saving import load_mamba, save_mamba
from mom_wrap.stats import MemoryStats
from mom_wrap.training import BalanceLossScaleCallback
from mom_wrap.wrapper import MixtureOfMemories

__version__ = '0.1.0'
__all__ = ['BalanceLossScaleCallback', 'MemoryStats', 'MixtureOfMemories', 'convert', 'import_fla_mom',
           'interpret_on_cpu', 'load_balancing_loss', 'load_mamba', 'save_mamba', 'set_balance_loss_scale',
           'set_balance_loss_weight', 'stats', 'supported_hosts']
