"""ipywidgets wizards for notebooks: project init, image builder, quota panel.

    from ds01hub.widgets import ProjectWizard, ImageBuilder, QuotaPanel
    ProjectWizard(guided=True)

They talk to the ds01 server extension of the jupyter server the kernel runs on, which does
project init on the user's files and forwards everything else to the hub-side ds01 service.
When that service cannot be reached they say so in a message box instead of failing.
"""

from .client import Ds01Client, Ds01Error
from .image_builder import ImageBuilder
from .project_wizard import ProjectWizard
from .quota_panel import QuotaPanel

__all__ = ["Ds01Client", "Ds01Error", "ImageBuilder", "ProjectWizard", "QuotaPanel"]
