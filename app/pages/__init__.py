"""The pages of the main window's flow: Model, Data, Adapter, Training (the run and history views live in app/)."""
