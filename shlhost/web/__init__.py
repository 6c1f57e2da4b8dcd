"""HTML pages: the landing page now; patient pages and the viewer come with the web app."""
