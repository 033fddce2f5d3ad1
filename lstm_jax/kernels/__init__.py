"""Layer 2, the kernels: faster ways to run one recurrent layer over a whole sequence, each a
function that takes every choice as an argument and is tested equal to the core scan.

* ``fused`` — custom-VJP LSTM, GRU and RNN layers (carry layout and saved factors passed in).
* ``onednn`` — the LSTM and GRU layers through oneDNN's RNN primitives on CPU (an optional C++
  extension built from ``csrc/``; threads and input route passed in).
* ``cudnn`` — LSTM stacks through ``jax.experimental.rnn`` (cuDNN on CUDA, MIOpen on ROCm): our
  params converted to its flat weight vector inside the program; tested on CPU through ``lstm_ref``.
* ``staggered`` — two stacked LSTM layers in one scan, the second a step behind (an accelerator
  lever that ``benchmarks/speed.py --set device`` measures).
"""
