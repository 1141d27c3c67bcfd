/**
 * Import the objects of a wsi-pipeline run into every image of a QuPath project (QuPath 0.4 - 0.6).
 *
 * Use: open the project, Automate > Script editor, open this file, set RUN_FOLDER to the run's output folder
 * (the `-o OUT` of `wsi-pipeline run`), then Run > Run for project. For each image the script looks for
 * RUN_FOLDER/<slide_id>/qupath.geojson, where <slide_id> is the image's file name made into an id exactly as
 * wsi-pipeline does it (docs/outputs.md): the name NFC-normalised, the slide extension removed, every run of
 * characters other than letters (any script), decimal digits, '.', '_' and '-' replaced by '_', and leading or
 * trailing '.' and '_' stripped.
 * Images without a matching file are reported and left alone; existing objects are kept unless CLEAR_FIRST.
 */
import groovy.transform.Field
import qupath.lib.io.PathIO

def RUN_FOLDER = '/path/to/OUT'
def CLEAR_FIRST = false

@Field def SLIDE_EXTENSIONS = ['.svs', '.tif', '.tiff', '.ndpi', '.vms', '.vmu', '.scn', '.mrxs', '.svslide', '.bif', '.dcm']
@Field def UNSAFE = /[^\p{L}\p{Nd}._-]+/

String slideId(String fileName) {
    def stem = java.text.Normalizer.normalize(fileName, java.text.Normalizer.Form.NFC)
    for (ext in SLIDE_EXTENSIONS) {
        if (stem.toLowerCase().endsWith(ext)) {
            stem = stem.substring(0, stem.length() - ext.length())
            break
        }
    }
    def safe = stem.replaceAll(UNSAFE, '_').replaceAll(/^[._]+|[._]+$/, '')
    return safe ? safe : 'slide'
}

def entry = getProjectEntry()
def uris = entry.getURIs()
def fileName = uris ? new File(uris[0]).getName() : entry.getImageName()
def geojson = new File(new File(RUN_FOLDER, slideId(fileName)), 'qupath.geojson')
if (!geojson.isFile()) {
    println "no ${geojson} for ${fileName}: skipped"
    return
}
if (CLEAR_FIRST)
    clearAllObjects()
def objects = PathIO.readObjects(geojson.toPath())
addObjects(objects)
println "${fileName}: ${objects.size()} objects from ${geojson}"
