"""The two front doors — HTTP API and the ``andon`` CLI — over one service layer."""
