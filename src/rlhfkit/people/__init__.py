"""Human feedback without the web: the database and its migrations (``db``), the judgement types
(``tasks``), every action in one transaction (``store``), projects, users and exports (``projects``,
``export``), agreement statistics (``agreement``), and the two stages that wait for people: ``collect``
(feedback for a reward model) and ``ab`` (the blind A/B of a policy against its reference).

It sits below the pipeline, which runs ``collect`` and ``ab`` as stages; the web app that people use
(:mod:`rlhfkit.annotate`) sits above it and serves the same database.
"""
