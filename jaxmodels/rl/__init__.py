"""Reinforcement learning: pure JAX environments (`envs`), episodes as fixed-shape arrays (`rollout`), dynamic
programming references (`dp`), Monte Carlo prediction and control (`monte_carlo`), linear value-function
approximation (`approximation`) and DQN (`dqn`). Rollouts are `lax.scan`s, many environments run under `vmap`, and
each training loop is one jitted program (the PureJaxRL idea).
"""
