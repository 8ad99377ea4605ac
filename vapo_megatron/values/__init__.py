"""Value sources other than the critic: Monte-Carlo values from step boundaries (mc.py, VinePPO-style), also the
critic-quality probe (`ev_oracle`)."""
