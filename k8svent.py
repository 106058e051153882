from upgrade_section import *  # noqa: F401,F403  (stub; replaced at merge)
