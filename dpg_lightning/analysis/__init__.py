"""How well DPG's reward approximates what it stands for (no Lightning; plain functions).

DPG replaces each example's leave-one-out effect ``Phi(D) - Phi(D with eps_i = 0)`` by its
first-order estimate ``r_i = dPhi/deps_i`` at ``eps = 1``, and so the true generator gradient
``grad E_D[Phi(SFT(D))]`` by ``E_D[sum_i r_i grad log pi(x_i)]``. Nothing in training measures
that approximation; these modules do:

- :mod:`~dpg_lightning.analysis.inner_calls`: the one place that calls the inner SFT and the
  exact metagradient.
- :mod:`~dpg_lightning.analysis.leave_one_out`: exact leave-one-out differences by re-running
  the plain SFT, in float64, with their rounding floor.
- :mod:`~dpg_lightning.analysis.agreement`: correlations, slopes, relative error and sign
  agreement between rewards and leave-one-out, the JSON report and the scatter plot.
- :mod:`~dpg_lightning.analysis.enumerated`: the exact generator gradient on a case small
  enough to enumerate every synthetic set, against DPG's and REINFORCE's expected updates.
"""
