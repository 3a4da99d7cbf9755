"""The vhost-user back-end protocol: a sans-IO core, a trio server and a front-end for tests."""
