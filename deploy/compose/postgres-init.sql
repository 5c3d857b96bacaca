-- First start of the compose PostgreSQL: MLflow's tracking and registry store lives next to the
-- services' database (`flywheel`, one schema per service, created by their migrations).
CREATE DATABASE flywheel_mlflow;
