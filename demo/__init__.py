"""``distill-demo``: the whole pipeline on scikit-learn's bundled digits (``demo.digits``), and the
validation sweep that chose its defaults (``demo.sweep``)."""
